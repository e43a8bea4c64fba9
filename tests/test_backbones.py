"""Backbone registry, preprocessing, checkpoint loading with a strict key check, content keys."""
import numpy as np
import pytest
import torch
from torch import nn

from extract.backbones import (
    BACKBONES,
    CheckpointMismatch,
    CifarResNet,
    Preprocessing,
    checkpoint_backbone,
    densenet_bc_100,
    get_backbone_spec,
    import_factory,
    read_state_dict,
    registered_backbone,
)
from extract.datasets import load_dataset
from extract.extraction import forward_rows


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
        head = modules[spec.head]  # a linear layer, or BiT's 1x1 convolution with bias
        assert isinstance(head, nn.Linear) or (isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1))
        assert all(layer in modules for layer in (*spec.layers, spec.shaping_layer))
    with pytest.raises(ValueError, match="unknown backbone architecture 'nope'; registered: bit-s-r101x1, "
                                         "cifar-resnet18, cifar-resnet20, cifar-resnet32, cifar-resnet44, "
                                         "cifar-resnet56, cnn28, densenet-bc-100, densenet-bc-100-um, "
                                         "densenet121, digits-net, "
                                         "mnist-convnet-oe, mobilenet-v2, resnet50, wrn-40-2, wrn-40-4"):
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
    with pytest.raises(FileNotFoundError, match="does not exist"):
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
    """The MNIST ConvNet of the Outlier Exposure paper, written from ../shared/data/README.md as
    plain functional calls: the reference for the registry's ``mnist-convnet-oe``."""

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


def test_registered_oe_convnet_equals_the_functional_reference_with_the_same_state():
    torch.manual_seed(0)
    reference = OEConvNet().eval()
    backbone = registered_backbone(get_backbone_spec("mnist-convnet-oe"), reference.state_dict(), "oe", 10)
    assert sum(p.numel() for p in backbone.model.parameters()) == 260 + 5020 + 16050 + 510
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    outputs = forward_rows(backbone, images, ("act2",), 4, torch.device("cpu"))
    x = torch.from_numpy(images).float()[:, None] / 255  # no normalisation
    with torch.no_grad():
        np.testing.assert_allclose(outputs["logits"], reference(x).numpy(), atol=1e-5)
        penultimate = reference.act(reference.fc1(reference.act(nn.functional.max_pool2d(reference.conv2(
            reference.act(nn.functional.max_pool2d(reference.conv1(x), 2))), 2)).flatten(1)))
    np.testing.assert_allclose(outputs["features"], penultimate.numpy(), atol=1e-5)
    assert outputs["act2"].shape == (7, 20, 4, 4)


@pytest.mark.shared_data
def test_registered_oe_convnet_reproduces_the_published_test_errors(shared_data):
    mnist = load_dataset("mnist", "test", data_root=shared_data)
    spec = get_backbone_spec("mnist-convnet-oe")
    errors = {}
    for name in ("baseline_epoch_9", "oe_scratch_epoch_9", "oe_tune_epoch_4"):
        state = read_state_dict(shared_data / f"checkpoints/mnist-convnet-oe/{name}.pt")
        backbone = registered_backbone(spec, state, name, 10)
        logits = forward_rows(backbone, mnist.images, (), 1000, torch.device("cpu"))["logits"]
        errors[name] = (logits.argmax(1) != mnist.labels).mean()
    assert errors["baseline_epoch_9"] == pytest.approx(0.0094)  # the README's 0.94%: 94 of 10,000 wrong
    assert errors["oe_scratch_epoch_9"] == pytest.approx(0.0103) and errors["oe_tune_epoch_4"] == pytest.approx(0.0092)


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


# Parameter counts by hand: a conv k x k from a to b channels (no bias) has k*k*a*b weights, a batch norm
# over c channels 2c (weight, bias), a linear head D -> 10 has 10*D + 10.
def densenet_bc_100_parameters(bn=2):
    # bottleneck layer on c input channels, k = 12: BN(c) + conv1x1 c -> 48 + BN(48) + conv3x3 48 -> 12
    # = 2c + 48c + 96 + 5184 = 50c + 5280; a dense block of 16 layers from c0 sums c = 16*c0 + 12*(0+...+15).
    # bn: parameters per batch-norm channel, 2 (weight, bias), or 0 without them (the UM code's DenseNet).
    block = lambda c0: (48 + bn) * (16 * c0 + 12 * 120) + 16 * (5184 + 48 * bn)  # noqa: E731
    transition = lambda c: bn * c + c * (c // 2)  # noqa: E731  BN(c) + conv1x1 c -> c/2
    # conv1 3 -> 24; blocks from 24 (-> 216), 108 (-> 300), 150 (-> 342); final BN(342); fc 342 -> 10
    return (9 * 3 * 24 + block(24) + transition(216) + block(108) + transition(300) + block(150)
            + bn * 342 + 342 * 10 + 10)


def wrn_40_parameters(k):
    # pre-activation block a -> w: BN(a) + conv3x3 a -> w + BN(w) + conv3x3 w -> w (+ 1x1 shortcut a -> w)
    block = lambda a, w: 2 * a + 9 * a * w + 2 * w + 9 * w * w + (a * w if a != w else 0)  # noqa: E731
    group = lambda a, w: block(a, w) + 5 * block(w, w)  # noqa: E731  6 blocks per group for depth 40
    return (9 * 3 * 16 + group(16, 16 * k) + group(16 * k, 32 * k) + group(32 * k, 64 * k)
            + 2 * 64 * k + 64 * k * 10 + 10)


def resnet18_parameters():
    # block a -> w: conv3x3 a -> w + BN(w) + conv3x3 w -> w + BN(w) (+ shortcut conv1x1 a -> w + BN(w))
    block = lambda a, w: 9 * a * w + 2 * w + 9 * w * w + 2 * w + (a * w + 2 * w if a != w else 0)  # noqa: E731
    stage = lambda a, w: block(a, w) + block(w, w)  # noqa: E731
    return 9 * 3 * 64 + 2 * 64 + stage(64, 64) + stage(64, 128) + stage(128, 256) + stage(256, 512) + 512 * 10 + 10


# name -> (parameters, published count, penultimate dimension, {layer: (C, H, W)} incl. the shaping layer)
CIFAR_ARCHITECTURES = {
    "densenet-bc-100": (densenet_bc_100_parameters(), 769_162, 342,
                        {"conv1": (24, 32, 32), "trans1": (108, 16, 16), "trans2": (150, 8, 8), "relu": (342, 8, 8),
                         "bn1": (342, 8, 8)}),
    # the published count less the 23,988 weights and biases of its 99 batch norms
    "densenet-bc-100-um": (densenet_bc_100_parameters(bn=0), 769_162 - 23_988, 342,
                           {"conv1": (24, 32, 32), "trans1": (108, 16, 16), "trans2": (150, 8, 8),
                            "relu": (342, 8, 8), "bn1": (342, 8, 8)}),
    "wrn-40-2": (wrn_40_parameters(2), 2_243_546, 128,
                 {"block1": (32, 32, 32), "block2": (64, 16, 16), "block3": (128, 8, 8), "bn1": (128, 8, 8)}),
    "wrn-40-4": (wrn_40_parameters(4), 8_949_210, 256,
                 {"block1": (64, 32, 32), "block2": (128, 16, 16), "block3": (256, 8, 8), "bn1": (256, 8, 8)}),
    "cifar-resnet18": (resnet18_parameters(), 11_173_962, 512,
                       {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8),
                        "layer4": (512, 4, 4), "layer4.1.merge": (512, 4, 4)}),
}


def cifar_images(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def random_backbone(arch, seed=0):
    """A registry architecture with seeded random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    spec = get_backbone_spec(arch)
    model = spec.build()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return registered_backbone(spec, model.state_dict(), arch, 10)


@pytest.mark.parametrize("arch", sorted(CIFAR_ARCHITECTURES))
def test_cifar_architectures_parameter_counts(arch):
    derived, published, _, _ = CIFAR_ARCHITECTURES[arch]
    model = get_backbone_spec(arch).build()
    assert derived == published
    assert sum(p.numel() for p in model.parameters()) == published
    assert get_backbone_spec(arch).build(num_classes=100)(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("arch", sorted(CIFAR_ARCHITECTURES))
def test_cifar_architectures_features_layers_and_shaping_layer(arch):
    _, _, dim, shapes = CIFAR_ARCHITECTURES[arch]
    backbone = random_backbone(arch)
    assert set(shapes) == {*backbone.layers, backbone.shaping_layer}
    rows = forward_rows(backbone, cifar_images(), tuple(shapes), batch_size=2, device=torch.device("cpu"))
    for layer, shape in shapes.items():
        assert rows[layer].shape == (2, *shape), layer
    # the hooked head input is the penultimate feature: the logits are W v + b
    W, b = backbone.head_parameters()
    assert rows["features"].shape == (2, dim) and W.shape == (10, dim)
    np.testing.assert_allclose(rows["logits"], rows["features"] @ W.T + b, rtol=1e-5, atol=1e-4)  # float32 rounding
    # ... and the global average of the ReLU of the shaping layer (the last block before its final ReLU),
    # which can be negative, while the feature cannot
    shaping = rows[backbone.shaping_layer]
    assert (shaping < 0).any() and (rows["features"] >= 0).all()
    np.testing.assert_allclose(rows["features"], np.maximum(shaping, 0).mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)


def test_densenet_and_resnet18_stage_outputs():
    backbone = random_backbone("densenet-bc-100")
    model = backbone.model
    x = backbone.preprocessing(cifar_images(1))
    with torch.no_grad():
        grown = model.block1(model.conv1(x))
        assert grown.shape == (1, 216, 32, 32)  # 24 + 16 * 12
        torch.testing.assert_close(grown[:, :24], model.conv1(x))  # dense connectivity keeps the input channels
        layer = model.block1.layer[0]  # bn1, conv1 (1x1, 48), bn2, conv2 (3x3, 12)
        assert (layer.conv1.weight.shape, layer.conv2.weight.shape) == ((48, 24, 1, 1), (12, 48, 3, 3))
        assert model.trans1.conv1.weight.shape == (108, 216, 1, 1)
        assert model.trans2.conv1.weight.shape == (150, 300, 1, 1)
    resnet = random_backbone("cifar-resnet18")
    rows = forward_rows(resnet, cifar_images(), ("layer4", "layer4.1.merge"), 2, torch.device("cpu"))
    np.testing.assert_array_equal(rows["layer4"], np.maximum(rows["layer4.1.merge"], 0))


def test_wrn_block_is_pre_activation_with_projection_of_the_activated_input():
    model = random_backbone("wrn-40-2").model
    block, same = model.block2.layer[0], model.block2.layer[1]  # 32 -> 64, stride 2; then 64 -> 64
    assert block.convShortcut.weight.shape == (64, 32, 1, 1) and same.convShortcut is None
    assert model.block1.layer[0].convShortcut is not None  # 16 -> 32 for k = 2
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        act = torch.relu(block.bn1(x))
        residual = block.conv2(torch.relu(block.bn2(block.conv1(act))))
        torch.testing.assert_close(block(x), residual + block.convShortcut(act))
        y = torch.randn(2, 64, 8, 8)
        residual = same.conv2(torch.relu(same.bn2(same.conv1(torch.relu(same.bn1(y))))))
        torch.testing.assert_close(same(y), residual + y)


@pytest.mark.parametrize("arch", ["densenet-bc-100", "wrn-40-2", "cifar-resnet18"])
def test_cifar_architectures_are_deterministic_in_eval_mode(arch):
    model = random_backbone(arch).model
    x = get_backbone_spec(arch).preprocessing(cifar_images())
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_wrn_dropout_acts_only_in_train_mode():
    spec = get_backbone_spec("wrn-40-2")
    x = spec.preprocessing(cifar_images())
    torch.manual_seed(0)
    model = spec.build()  # dropout 0.3 by default, the OE setting
    assert {b.drop_rate for b in model.modules() if hasattr(b, "drop_rate")} == {0.3}
    with torch.no_grad():
        model.train()  # batch statistics: deterministic apart from dropout
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
        torch.manual_seed(0)
        plain = spec.build(drop_rate=0.0).train()
        assert torch.equal(plain(x), plain(x))


# keys of the public checkpoints (densenet.py of ODIN / energy_ood, wrn.py of OE, kuangliu's resnet.py)
PUBLIC_KEYS = {
    "densenet-bc-100": {"conv1.weight": (24, 3, 3, 3), "block1.layer.0.bn1.weight": (24,),
                        "block1.layer.0.conv1.weight": (48, 24, 1, 1), "block1.layer.15.conv2.weight": (12, 48, 3, 3),
                        "trans1.bn1.running_var": (216,), "trans1.conv1.weight": (108, 216, 1, 1),
                        "block3.layer.15.bn2.bias": (48,), "bn1.weight": (342,), "fc.weight": (10, 342)},
    # the UM code's checkpoints (densenet_cifar{10,100}_{best,last}.state): NonAffineBatchNorm keeps only statistics
    "densenet-bc-100-um": {"conv1.weight": (24, 3, 3, 3), "block1.layer.0.bn1.running_mean": (24,),
                           "block1.layer.0.conv1.weight": (48, 24, 1, 1), "block1.layer.0.bn2.running_var": (48,),
                           "trans1.bn1.running_var": (216,), "trans1.conv1.weight": (108, 216, 1, 1),
                           "bn1.running_mean": (342,), "fc.weight": (10, 342), "fc.bias": (10,)},
    "wrn-40-2": {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.bn1.weight": (16,),
                 "block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block3.layer.5.conv2.weight": (128, 128, 3, 3),
                 "block3.layer.0.convShortcut.weight": (128, 64, 1, 1), "bn1.running_mean": (128,), "fc.bias": (10,)},
    "cifar-resnet18": {"conv1.weight": (64, 3, 3, 3), "bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
                       "layer2.0.shortcut.0.weight": (128, 64, 1, 1), "layer2.0.shortcut.1.running_var": (128,),
                       "layer4.1.bn2.bias": (512,), "linear.weight": (10, 512)},
}


@pytest.mark.parametrize("arch", sorted(PUBLIC_KEYS))
def test_cifar_architectures_load_public_checkpoint_layout(tmp_path, arch):
    state = random_backbone(arch, seed=4).model.state_dict()
    for key, shape in PUBLIC_KEYS[arch].items():
        assert tuple(state[key].shape) == shape, key
    # no shortcut keys where the shape is kept; identity helpers (merge, relu) add no keys
    assert "block2.layer.1.convShortcut.weight" not in state and "layer1.0.shortcut.0.weight" not in state
    assert not any("merge" in k or "relu" in k for k in state)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")},
                "epoch": 100}, path)
    loaded = registered_backbone(get_backbone_spec(arch), read_state_dict(path), arch, 10)
    assert loaded.key == random_backbone(arch, seed=4).key


def test_um_densenet_has_the_um_codes_dropout_batch_norm_and_normalisation():
    """Issue 17, item 8: the UM code's DenseNet (models/densenet.py, built with configs/smallscale's
    droprate 0.3 and bn_type NonAffineBatchNorm, utils/bn_type.py: BatchNorm2d(dim, affine=False))."""
    spec = get_backbone_spec("densenet-bc-100-um")
    model = spec.build()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 99  # 3 blocks x 16 layers x 2, two transitions, the final one
    assert all(not m.affine and m.weight is None and m.bias is None and m.track_running_stats for m in norms)
    assert {m.drop_rate for m in model.modules() if hasattr(m, "drop_rate")} == {0.3}
    # the normaliser main.py puts inside the UM model (Hendrycks' constants)
    assert spec.preprocessing == Preprocessing(32, 3, (125.3 / 255, 123.0 / 255, 113.9 / 255),
                                               (63.0 / 255, 62.1 / 255, 66.7 / 255))
    # the default densenet-bc-100 is as before: affine batch norms, no dropout
    plain = get_backbone_spec("densenet-bc-100").build()
    assert all(m.affine for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    assert {m.drop_rate for m in plain.modules() if hasattr(m, "drop_rate")} == {0.0}
    # dropout acts in train mode only
    x = spec.preprocessing(cifar_images())
    um = random_backbone("densenet-bc-100-um").model
    with torch.no_grad():
        torch.manual_seed(0)
        assert not torch.equal(um.train()(x), um(x))
        assert torch.equal(um.eval()(x), um(x))
        # in eval mode a batch norm without weights is an affine one with weight 1 and bias 0
        affine = densenet_bc_100(bn_affine=True)
        state = {**um.state_dict(), **{f"{name}.{p}": torch.full((m.num_features,), float(p == "weight"))
                                        for name, m in affine.named_modules() if isinstance(m, nn.BatchNorm2d)
                                        for p in ("weight", "bias")}}
        affine.load_state_dict(state)
        torch.testing.assert_close(affine.eval()(x), um(x))
