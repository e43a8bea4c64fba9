"""Backbone registry, preprocessing, checkpoint loading with a strict key check, content keys."""
import numpy as np
import pytest
import torch
from torch import nn

from extract.backbones import (BACKBONES, CheckpointMismatch, CifarResNet, Preprocessing, checkpoint_backbone,
                               get_backbone_spec, import_factory, read_state_dict, registered_backbone)
from extract.datasets import load_dataset


def digits_backbone(seed=0):
    torch.manual_seed(seed)
    spec = get_backbone_spec("digits-net")
    return registered_backbone(spec, spec.build(num_classes=6).state_dict(), "digits-net", 6)


def test_preprocessing_uint8_grayscale():
    prep = Preprocessing(input_size=2, channels=1, mean=(0.5,), std=(0.25,))
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    # (x/255 - 0.5) / 0.25: 0 -> -2, 255 -> 2, 51 -> -1.2, 102 -> -0.4
    np.testing.assert_allclose(prep(images).numpy(), [[[[-2.0, 2.0], [-1.2, -0.4]]]], atol=1e-6)


def test_preprocessing_channels_and_resize():
    rgb = np.zeros((1, 4, 4, 3), dtype=np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 1.0, 0.5, 0.0
    gray = Preprocessing(4, 1, (0.0,), (1.0,))(rgb)
    np.testing.assert_allclose(gray.numpy(), np.full((1, 1, 4, 4), 0.299 + 0.5 * 0.587), atol=1e-6)
    to_rgb = Preprocessing(4, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(np.full((1, 4, 4), 0.25, dtype=np.float32))
    assert to_rgb.shape == (1, 3, 4, 4) and torch.allclose(to_rgb, torch.full_like(to_rgb, 0.25))
    # Resizing a constant image keeps it constant; the size is what was asked.
    resized = Preprocessing(8, 1, (0.0,), (1.0,))(np.full((2, 3, 3), 0.75, dtype=np.float32))
    assert resized.shape == (2, 1, 8, 8) and torch.allclose(resized, torch.full_like(resized, 0.75), atol=1e-6)
    with pytest.raises(ValueError, match="need 3 values each"):
        Preprocessing(8, 3, (0.0,), (1.0,))


def test_registry_layers_exist_and_head_is_linear():
    for spec in BACKBONES.values():
        model = spec.build()
        modules = dict(model.named_modules())
        assert isinstance(modules[spec.head], nn.Linear)
        assert all(layer in modules for layer in spec.layers)
    with pytest.raises(ValueError, match="unknown backbone architecture 'nope'; registered: cifar-resnet20, "
                                         "cifar-resnet32, cifar-resnet44, cifar-resnet56, cnn28, digits-net"):
        get_backbone_spec("nope")


def test_cnn28_penultimate_feature_is_pooled_relu_output():
    torch.manual_seed(0)
    model = get_backbone_spec("cnn28").build().eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        features = model.pool(model.block3(model.block2(model.block1(x))))
        assert features.shape == (3, 64) and (features >= 0).all()
        torch.testing.assert_close(model(x), model.fc(features))


def test_backbone_key_tracks_weights_and_preprocessing():
    a, b = digits_backbone(0), digits_backbone(0)
    assert a.key == b.key
    assert digits_backbone(1).key != a.key
    with torch.no_grad():
        b.model.fc.bias[0] += 1e-6
    b.__post_init__()
    assert b.key != a.key
    W, bias = a.head_parameters()
    np.testing.assert_array_equal(W, a.model.fc.weight.detach().numpy())
    np.testing.assert_array_equal(bias, a.model.fc.bias.detach().numpy())


def save_checkpoint(path, state, wrap=False):
    if wrap:  # the layout of the CIFAR ResNet checkpoints: {'state_dict': {'module.' + key: tensor}}
        state = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    torch.save(state, path)
    return path


@pytest.mark.parametrize("wrap", [False, True])
def test_checkpoint_backbone_loads_module_factory(tmp_path, wrap):
    reference = digits_backbone(3)
    path = save_checkpoint(tmp_path / "net.pt", reference.model.state_dict(), wrap)
    loaded = checkpoint_backbone("mine", "extract.backbones:digits_net", path, reference.preprocessing, "fc",
                                 ("block1",), {"num_classes": 6})
    assert loaded.key == checkpoint_backbone("mine", "extract.backbones:digits_net", path, reference.preprocessing,
                                             "fc", (), {"num_classes": 6}).key
    x = reference.preprocessing(load_dataset("digits", "test").images[:5])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference.model.eval()(x))


def test_checkpoint_key_mismatch_lists_the_keys(tmp_path):
    state = digits_backbone().model.state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    state["block1.0.weight"] = torch.zeros(3, 1, 3, 3)
    path = save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(CheckpointMismatch) as info:
        checkpoint_backbone("bad", "extract.backbones:digits_net", path, Preprocessing(8, 1, (0.0,), (1.0,)), "fc")
    message = str(info.value)
    assert "missing keys (1): fc.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "block1.0.weight: checkpoint (3, 1, 3, 3) vs model (16, 1, 3, 3)" in message


def test_checkpoint_and_factory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(tmp_path / "absent.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        import_factory("no_colon")
    with pytest.raises(ValueError, match="cannot import module 'not_a_module_xyz'"):
        import_factory("not_a_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        import_factory("extract.backbones:nope")
    backbone = digits_backbone()
    path = save_checkpoint(tmp_path / "ok.pt", backbone.model.state_dict())
    with pytest.raises(ValueError, match="has no module named 'classifier'"):
        checkpoint_backbone("x", "extract.backbones:digits_net", path, backbone.preprocessing, "classifier")


class OEConvNet(nn.Module):
    """The MNIST ConvNet of the Outlier Exposure paper, written from ../shared/data/README.md."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    @staticmethod
    def act(x):
        return x * torch.sigmoid(1.702 * x)

    def forward(self, x):
        x = self.act(nn.functional.max_pool2d(self.conv1(x), 2))
        x = self.act(nn.functional.max_pool2d(self.conv2(x), 2))
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def build_oe_convnet():
    return OEConvNet()


@pytest.mark.shared_data
def test_real_outlier_exposure_checkpoint_loads_strictly_and_classifies_mnist(shared_data):
    backbone = checkpoint_backbone("oe-baseline", "tests.test_backbones:build_oe_convnet",
                                   shared_data / "checkpoints/mnist-convnet-oe/baseline_epoch_9.pt",
                                   Preprocessing(28, 1, (0.0,), (1.0,)), "fc2")
    mnist = load_dataset("mnist", "test", data_root=shared_data)
    with torch.no_grad():
        predictions = backbone.model(backbone.preprocessing(mnist.images)).argmax(1).numpy()
    # The paper's checkpoint has 0.94% test error.
    assert (predictions == mnist.labels).mean() == pytest.approx(1 - 0.0094, abs=0.002)


def option_a_checkpoint(path, depth, seed=0):
    """A checkpoint in the public option-A ResNets' format: {'state_dict': ...}, every key prefixed
    'module.' (nn.DataParallel), no batch-norm num_batches_tracked counters (pre-0.4.1 PyTorch)."""
    torch.manual_seed(seed)
    state = get_backbone_spec(f"cifar-resnet{depth}").build().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")},
                "best_prec1": 91.0}, path)
    return state


@pytest.mark.parametrize("depth, blocks", [(20, 3), (56, 9)])
def test_option_a_resnet_loads_its_checkpoint_format_and_pads_the_shortcut(tmp_path, depth, blocks):
    state = option_a_checkpoint(tmp_path / "resnet.th", depth)
    spec = get_backbone_spec(f"cifar-resnet{depth}")
    backbone = registered_backbone(spec, read_state_dict(tmp_path / "resnet.th"), f"resnet{depth}", 10)
    assert backbone.shaping_layer == f"layer3.{blocks - 1}.merge" and backbone.head == "linear"
    assert sum(p.numel() for p in backbone.model.parameters()) == {20: 269722, 56: 853018}[depth]
    for key, value in backbone.model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    block = backbone.model.layer2[0]  # 16 -> 32 channels, stride 2: x[:, :, ::2, ::2] padded by 8 on each side
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        residual = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        expected = torch.relu(residual + torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
        np.testing.assert_allclose(block(x).numpy(), expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="depth 6n \\+ 2"):
        CifarResNet(depth=21)


@pytest.mark.shared_data
def test_real_cifar_resnet_checkpoints_classify_lossless_cifar10(shared_data):
    data = np.load(shared_data / "cifar10-test-lossless846.npz")
    for depth in (20, 56):
        [path] = (shared_data / "checkpoints/cifar10-resnet").glob(f"resnet{depth}-*.th")
        spec = get_backbone_spec(f"cifar-resnet{depth}")
        backbone = registered_backbone(spec, read_state_dict(path), f"resnet{depth}", 10)
        with torch.no_grad():
            predictions = backbone.model(spec.preprocessing(data["images"])).argmax(1).numpy()
        assert (predictions == data["labels"]).mean() > 0.9  # the data README: 92-94% on the lossless images
