"""The device is not part of a cache entry's key, so an entry extracted on a CUDA GPU must hold the
CPU's numbers within float32 rounding: extraction (arrays and image files through DataLoader
workers and pinned memory), AMP (float16 there, an entry of its own) and the network methods.
The GPU tests skip on a machine without CUDA; the precision switch they rely on is checked everywhere."""
import numpy as np
import pytest
import torch

from extract.backbones import get_backbone_spec, registered_backbone
from extract.datasets import ImageSet, load_dataset
from extract.extraction import extract, precision
from extract.network import derive
from extract.store import FeatureStore
from methods import make_method
from tests.test_extraction import randomise_batch_norm
from tests.test_paper_datasets import write_images

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
LAYERS = ("layer2", "layer3")


def resnet20():
    """CIFAR ResNet-20 with seeded weights and batch-norm statistics far from the identity."""
    torch.manual_seed(0)
    spec = get_backbone_spec("cifar-resnet20")
    model = randomise_batch_norm(spec.build(num_classes=10))
    return registered_backbone(spec, model.state_dict(), "resnet20-seeded", 10)


def rgb_images(n=96, seed=0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet("noise", "test", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    rng.integers(0, 10, n).astype(np.int64), "seeded uniform noise")


def assert_close_arrays(gpu: np.ndarray, cpu: np.ndarray, what: str, tolerance: float = 1e-4):
    """Equal within float32 rounding of a 20-layer network, relative to the array's scale."""
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype, what
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=tolerance * max(1.0, float(np.abs(cpu).max())), err_msg=what)


def test_float32_precision_switches_tf32_off_on_cuda_and_restores_the_global_flags():
    """Runs without a GPU: the switch only sets torch's flags."""
    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as a user might, for speed elsewhere
    try:
        with precision(torch.device("cuda"), amp=False):
            assert cudnn.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"
        assert cudnn.allow_tf32 is before[0] and torch.get_float32_matmul_precision() == "high"
        with pytest.raises(RuntimeError, match="inside"), precision(torch.device("cuda"), amp=False):
            raise RuntimeError("inside")
        assert cudnn.allow_tf32 is before[0] and torch.get_float32_matmul_precision() == "high"
        with precision(torch.device("cpu"), amp=False):  # nothing to switch on the CPU
            assert torch.get_float32_matmul_precision() == "high"
        with precision(torch.device("cpu"), amp=True):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    finally:
        torch.set_float32_matmul_precision(before[1])


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_extraction_is_the_cpu_entry_with_the_same_numbers(tmp_path):
    backbone, images = resnet20(), rgb_images()
    cpu = extract(backbone, images, FeatureStore(tmp_path / "cpu"), layers=LAYERS, batch_size=32, progress=False)
    gpu = extract(backbone, images, FeatureStore(tmp_path / "cuda"), layers=LAYERS, batch_size=32, device="cuda",
                  progress=False)
    assert gpu.path.relative_to(tmp_path / "cuda") == cpu.path.relative_to(tmp_path / "cpu")  # one key
    for name in ("logits", "features"):
        assert_close_arrays(getattr(gpu, name), getattr(cpu, name), name)
    for layer in LAYERS:
        assert_close_arrays(gpu.activations(layer), cpu.activations(layer), layer)
    np.testing.assert_array_equal(gpu.labels, cpu.labels)
    np.testing.assert_array_equal(gpu.logits.argmax(1), cpu.logits.argmax(1))


@pytest.mark.gpu
@needs_cuda
def test_image_files_decoded_by_workers_into_pinned_memory_give_the_cpu_numbers(tmp_path):
    write_images(tmp_path / "SUN" / "images", [(40, 48), (32, 32), (64, 50)] * 8)
    files = load_dataset("sun", "test", data_root=tmp_path, size=32, fit="squash")
    backbone = resnet20()
    cpu = extract(backbone, files, FeatureStore(tmp_path / "cpu"), batch_size=8, progress=False)
    gpu = extract(backbone, files, FeatureStore(tmp_path / "cuda"), batch_size=8, device="cuda", workers=2,
                  progress=False)
    assert_close_arrays(gpu.logits, cpu.logits, "logits")
    assert_close_arrays(gpu.features, cpu.features, "features")


@pytest.mark.gpu
@needs_cuda
def test_amp_on_cuda_is_float16_an_entry_of_its_own_and_close_to_float32(tmp_path):
    backbone, images = resnet20(), rgb_images()
    store = FeatureStore(tmp_path)
    exact = extract(backbone, images, store, device="cuda", progress=False)
    mixed = extract(backbone, images, store, device="cuda", amp=True, progress=False)
    assert mixed.path != exact.path and mixed.meta["amp"] is True
    assert not np.array_equal(mixed.logits, exact.logits)
    assert_close_arrays(mixed.logits, exact.logits, "amp logits", tolerance=2e-2)
    assert (mixed.logits.argmax(1) == exact.logits.argmax(1)).mean() > 0.95


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name, params", [
    ("ash_layer", {"variant": "s", "p": 80}),  # at the last block, before its ReLU: the tail re-run
    ("odin", {"T": 1000.0, "epsilon": 0.0014}),  # forward, input gradient, forward
    ("gradnorm_autograd", {"T": 1.0}),  # per-sample autograd through the head
])
def test_network_methods_on_cuda_give_the_cpu_outputs(tmp_path, name, params):
    method = make_method(name, **params)
    backbone, images = resnet20(), rgb_images(n=64)
    outputs = {}
    for device in ("cpu", "cuda"):
        store = FeatureStore(tmp_path / device)
        entry = extract(backbone, images, store, layers=LAYERS, batch_size=32, progress=False)
        outputs[device] = derive(method, backbone, images, entry, store, batch_size=32, device=device,
                                 progress=False)
    for output in method.outputs:
        # ODIN's sign map may flip where a pixel's input gradient is ~0 on one device: a tiny step
        tolerance = 1e-3 if method.name == "odin" else 1e-4
        assert_close_arrays(outputs["cuda"].array(output), outputs["cpu"].array(output), output, tolerance)
