"""The ImageNet backbones of the registry: torchvision's ResNet-50, MobileNetV2 and DenseNet-121, and BiT-S-R101x1.

No pretrained weights are needed: checkpoints are written from random weights, and the networks run on
64x64 inputs (the published counts and key names do not depend on the input size)."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import models, transforms

from extract.backbones import (
    BIT_NORM,
    IMAGENET_NORM,
    Backbone,
    Preprocessing,
    ResNetV2,
    StdConv2d,
    bit_npz_key,
    get_backbone_spec,
    load_bit_npz,
    load_state_dict_strict,
    read_state_dict,
    registered_backbone,
)
from extract.extraction import forward_rows
from extract.network import Network
from methods import make_method

TORCHVISION = {"resnet50": models.resnet50, "mobilenet-v2": models.mobilenet_v2, "densenet121": models.densenet121}
PUBLISHED_PARAMETERS = {"resnet50": 25_557_032, "mobilenet-v2": 3_504_872, "densenet121": 7_978_856}
FEATURE_DIMS = {"resnet50": 2048, "mobilenet-v2": 1280, "densenet121": 1024, "bit-s-r101x1": 2048}


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def bit_parameter_count(block_units, width_factor: int, num_classes: int) -> int:
    """ResNet-v2 by hand: root 7x7 conv; per unit GN(cin), 1x1 cin->cmid, GN, 3x3 cmid->cmid, GN, 1x1 cmid->cout,
    the first unit of each block with a 1x1 cin->cout projection; final GN; 1x1 conv head with bias."""
    wf = width_factor
    count, cin = 7 * 7 * 3 * 64 * wf, 64 * wf
    for b, units in enumerate(block_units):
        cout, cmid = 256 * wf * 2 ** b, 64 * wf * 2 ** b
        for u in range(units):
            c = cin if u == 0 else cout
            count += 2 * c + c * cmid + 2 * cmid + 9 * cmid * cmid + 2 * cmid + cmid * cout
            count += c * cout if u == 0 else 0  # the projection
        cin = cout
    return count + 2 * cin + cin * num_classes + num_classes


def randomise_norms(model: nn.Module, x: torch.Tensor | None = None) -> None:
    """Random batch-norm / group-norm affine parameters and, given a batch x, batch-norm running statistics
    set to x's (momentum 1), so a checkpoint differs from a fresh model everywhere and eval activations are
    normalised."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 1.0
    if x is not None:
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()


def random_torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    reference = TORCHVISION[name](weights=None, num_classes=1000)
    randomise_norms(reference, torch.randn(2, 3, 64, 64))
    return reference


def old_densenet_keys(state: dict) -> dict:
    """The inverse of torchvision's renaming: norm1 -> norm.1, ..., and no batch-norm counters, as the
    published densenet121-a639ec97.pth (saved before PyTorch 0.4.1) has them."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")
    return {pattern.sub(r"\1.\2.\3", key): value for key, value in state.items()
            if not key.endswith("num_batches_tracked")}


def test_parameter_counts_are_the_published_ones():
    for name, count in PUBLISHED_PARAMETERS.items():
        assert parameter_count(get_backbone_spec(name).build(num_classes=1000)) == count
        assert parameter_count(TORCHVISION[name](weights=None, num_classes=1000)) == count
    bit = get_backbone_spec("bit-s-r101x1").build(num_classes=1000)
    # 44.5M, as the BiT-M-R101x1 / timm resnetv2_101x1_bit model cards give for a 1000-class head
    assert parameter_count(bit) == bit_parameter_count((3, 4, 23, 3), 1, 1000) == 44_541_480
    assert parameter_count(get_backbone_spec("bit-s-r101x1").build(num_classes=21843)) == 44_541_480 + 2049 * 20843


def test_registry_entries():
    for name, preprocessing in (("resnet50", IMAGENET_NORM), ("mobilenet-v2", IMAGENET_NORM),
                                ("densenet121", IMAGENET_NORM), ("bit-s-r101x1", BIT_NORM)):
        spec = get_backbone_spec(name)
        assert spec.preprocessing is preprocessing
        modules = dict(spec.build(num_classes=10).named_modules())
        assert all(layer in modules for layer in (spec.head, *spec.layers, spec.shaping_layer))
        head = modules[spec.head]
        assert head.weight.reshape(10, -1).shape == (10, FEATURE_DIMS[name])
    assert IMAGENET_NORM.resize_to == 256 and IMAGENET_NORM.input_size == 224
    assert BIT_NORM == Preprocessing(480, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_to=0)


@pytest.fixture(scope="module")
def references():
    """Random torchvision models (seed 0, random batch-norm parameters and statistics), built on first use."""
    built = {}

    def get(name: str) -> nn.Module:
        if name not in built:
            built[name] = random_torchvision(name)
        return built[name]

    return get


def small_input(backbone):
    """``backbone`` fed 64x64 images (its ImageNet normalisation, no resizing): fast on a CPU."""
    backbone.preprocessing = Preprocessing(64, 3, IMAGENET_NORM.mean, IMAGENET_NORM.std)
    return backbone


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_checkpoint_loads_with_the_same_keys_and_logits(name, references, tmp_path):
    """Keys, logits and the harness's captures; the shaping layer: ResNet-50's layer4.2.merge is the last
    bottleneck's sum before its ReLU (signed; layer4 is its ReLU), MobileNetV2's features.18 after a ReLU6
    (in [0, 6]), DenseNet-121's norm5 the batch norm before the ReLU, signed, also as captured (torchvision's
    own forwards apply those ReLUs in place, which would rewrite a hooked output)."""
    reference = references(name)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    spec = get_backbone_spec(name)
    backbone = small_input(registered_backbone(spec, read_state_dict(path), name, 1000))
    assert list(backbone.model.state_dict()) == list(reference.state_dict())
    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    layers = (spec.shaping_layer, "layer4") if name == "resnet50" else (spec.shaping_layer,)
    rows = forward_rows(backbone, images, layers, batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        expected = reference(backbone.preprocessing(images))
    np.testing.assert_allclose(rows["logits"], expected.numpy(), rtol=0, atol=1e-5)
    weight, bias = backbone.head_parameters()
    assert rows["features"].shape == (2, FEATURE_DIMS[name]) and (rows["features"] >= 0).all()
    np.testing.assert_allclose(rows["logits"], rows["features"] @ weight.T + bias, rtol=1e-4, atol=1e-4)
    shaped = rows[spec.shaping_layer]
    assert shaped.shape == (2, FEATURE_DIMS[name], 2, 2)
    if name == "mobilenet-v2":
        assert shaped.min() == 0 and shaped.max() <= 6
    else:
        assert shaped.min() < 0 < shaped.max()
    if name == "resnet50":
        np.testing.assert_array_equal(rows["layer4"], np.maximum(shaped, 0))


def test_densenet121_checkpoint_with_the_old_key_names_loads(references, tmp_path):
    reference = references("densenet121")
    old = old_densenet_keys(reference.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    assert "features.denseblock4.denselayer16.conv.2.weight" in old
    assert "features.denseblock1.denselayer1.norm1.weight" not in old
    path = tmp_path / "densenet121-old.pth"
    torch.save(old, path)
    backbone = registered_backbone(get_backbone_spec("densenet121"), read_state_dict(path), "densenet121", 1000)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(x), reference(x), rtol=0, atol=1e-5)


CPU = torch.device("cpu")


def test_resnet50_exposes_the_last_sum_with_torchvisions_keys_outputs_repr_and_cache_key(references):
    """The last bottleneck routes its sum through ``layer4.2.merge`` (an identity before the final ReLU) and
    is otherwise torchvision's: same state-dict keys in the same order (the torch-hub file loads strictly),
    bit-identical outputs, and the same repr, so the backbone's cache key is the plain torchvision model's
    (cached ResNet-50 entries are not re-keyed). ``ash_layer`` run from cached merge activations (the
    network's tail) gives the logits of the full pass with the hook."""
    reference = references("resnet50")
    spec = get_backbone_spec("resnet50")
    backbone = registered_backbone(spec, reference.state_dict(), "resnet50", 1000)
    model = backbone.model
    assert spec.shaping_layer == "layer4.2.merge"
    assert isinstance(dict(model.named_modules())["layer4.2.merge"], nn.Identity)
    assert list(model.state_dict()) == list(reference.state_dict())
    torchvision_model = models.resnet50(weights=None, num_classes=1000)
    torchvision_model.load_state_dict(reference.state_dict())
    assert repr(model) == repr(torchvision_model) and "merge" not in repr(model)
    plain = Backbone("resnet50", torchvision_model, spec.preprocessing, spec.head, spec.layers,
                     {"registry": "resnet50", "num_classes": 1000}, shaping_layer="layer4")
    assert backbone.key == plain.key
    small_input(backbone)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    images = np.random.default_rng(1).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    merge = forward_rows(backbone, images, ("layer4.2.merge",), batch_size=2, device=CPU)["layer4.2.merge"]
    network = Network(backbone, CPU, batch_size=2)
    assert network.tail("layer4.2.merge") is not None
    ash = make_method("ash_layer", variant="s", p=90.0)
    hooked = ash.network_outputs(network, SimpleNamespace(images=images, activations=lambda layer: None))
    cached = SimpleNamespace(images=images, activations=lambda layer: merge if layer == "layer4.2.merge" else None)
    tail = ash.network_outputs(network, cached)
    np.testing.assert_allclose(tail["logits"], hooked["logits"], rtol=1e-5, atol=1e-5 * np.abs(hooked["logits"]).max())


def official_ash(x: torch.Tensor, variant: str, p: float) -> torch.Tensor:
    """ASH as the official code (andrijazz/ash, ash.py: ash_p, ash_b, ash_s) computes it on a 4-D tensor, without
    its in-place writes: per sample, k = n - int(np.round(n p / 100)) of the n = C*H*W values are kept by
    torch.topk, the rest set to 0; ASH-P keeps them, ASH-B sets them to s1 / k, ASH-S scales them by
    exp(s1 / s2) (s1 the sum of all n values, s2 that of the kept ones). The k-th and (k+1)-th values must
    differ, so that which values are kept does not depend on how ties are broken."""
    assert x.dim() == 4
    flat = x.reshape(len(x), -1)
    n = flat.shape[1]
    k = n - int(np.round(n * p / 100.0))
    ordered = flat.sort(dim=1, descending=True).values
    assert (ordered[:, k - 1] > ordered[:, k]).all()
    s1 = flat.sum(dim=1, keepdim=True)
    values, indices = torch.topk(flat, k, dim=1)
    if variant == "b":
        values = (s1 / k).expand(-1, k)
    kept = torch.zeros_like(flat).scatter(1, indices, values)
    if variant == "s":
        kept = kept * torch.exp(s1 / kept.sum(dim=1, keepdim=True))
    return kept.reshape(x.shape)


def resnet50_body(model, x):
    return model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(F.relu(model.bn1(model.conv1(x))))))))


def resnet50_ash_in_the_last_block(model, x, ash):
    """The official ASH ResNet-50 (models/resnet_imagenet.py) with ``use_ash`` in the last Bottleneck: out = bn3
    branch; out += identity; ASH(out); ReLU; then average pooling and fc (its identity block has no downsample)."""
    h = model.layer4[:2](model.layer3(model.layer2(model.layer1(model.maxpool(F.relu(model.bn1(model.conv1(x))))))))
    last = model.layer4[2]
    out = F.relu(last.bn2(last.conv2(F.relu(last.bn1(last.conv1(h))))))
    out = F.relu(ash(last.bn3(last.conv3(out)) + h))
    return model.fc(torch.flatten(model.avgpool(out), 1))


def bit_pre_activation(model, x):
    return model.before_head.gn(model.body(model.root(x)))


BY_HAND = {  # (backbone, ash_layer's layer): a forward of the model's own modules with ASH written in
    # the official code's placements: in ResNet-50's last bottleneck (use_ash, switched off in that code), and
    # after the average pooling (what its ImageNet results use: resnet_imagenet.py, mobilenetv2.py and
    # densenet_imagenet.py apply ASH to the pooled (N, C, 1, 1) tensor before flatten and the classifier)
    ("resnet50", "last_block"): resnet50_ash_in_the_last_block,
    ("resnet50", "penultimate"):
        lambda m, x, ash: m.fc(torch.flatten(ash(m.avgpool(resnet50_body(m, x))), 1)),
    ("mobilenet-v2", "penultimate"):
        lambda m, x, ash: m.classifier(torch.flatten(ash(F.adaptive_avg_pool2d(m.features(x), (1, 1))), 1)),
    ("densenet121", "penultimate"):
        lambda m, x, ash: m.classifier(torch.flatten(ash(F.adaptive_avg_pool2d(F.relu(m.features(x)), (1, 1))), 1)),
    # the harness's counterparts where the official code has no in-block placement (MobileNetV2, DenseNet-121)
    # or no model (BiT): after MobileNetV2's last ReLU6, before DenseNet-121's and BiT's final ReLU
    ("mobilenet-v2", "last_block"):
        lambda m, x, ash: m.classifier(torch.flatten(F.adaptive_avg_pool2d(ash(m.features(x)), (1, 1)), 1)),
    ("densenet121", "last_block"):
        lambda m, x, ash: m.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(ash(m.features(x))), (1, 1)), 1)),
    ("bit-s-r101x1", "last_block"):
        lambda m, x, ash: m.head.conv(F.adaptive_avg_pool2d(F.relu(ash(bit_pre_activation(m, x))), 1))[..., 0, 0],
    ("bit-s-r101x1", "penultimate"):
        lambda m, x, ash: m.head.conv(ash(F.adaptive_avg_pool2d(F.relu(bit_pre_activation(m, x)), 1)))[..., 0, 0],
}
# the official configs' percentiles: ASH-S@90 (ResNet-50, MobileNetV2), ASH-S@99 (DenseNet-121); the paper's
# ASH-P@60 and ASH-B@65 in ResNet-50's last block, where a signed sum makes ASH-B and ASH-S differ from ASH after
# the block's ReLU
ASH_CASES = [("resnet50", "last_block", "s", 90.0), ("resnet50", "last_block", "b", 65.0),
             ("resnet50", "last_block", "p", 60.0), ("resnet50", "penultimate", "s", 90.0),
             ("mobilenet-v2", "penultimate", "s", 90.0), ("densenet121", "penultimate", "s", 99.0),
             ("mobilenet-v2", "last_block", "s", 90.0), ("densenet121", "last_block", "s", 99.0),
             ("bit-s-r101x1", "last_block", "s", 90.0), ("bit-s-r101x1", "penultimate", "s", 90.0)]


@pytest.mark.parametrize("name, layer, variant, p", ASH_CASES)
def test_ash_layer_equals_a_hand_written_forward_with_ash_at_its_place(name, layer, variant, p, references,
                                                                         request):
    """``ash_layer`` through the harness's ``Network`` (a hook on the declared shaping layer for last_block, on
    the head's input for penultimate) against the model's modules run by hand with ``official_ash`` inserted."""
    if name == "bit-s-r101x1":
        backbone = request.getfixturevalue("bit")
        model = backbone.model
    else:
        model = references(name)  # torchvision's own model: the hand-written forwards use its modules
        backbone = small_input(registered_backbone(get_backbone_spec(name), model.state_dict(), name, 1000))
    images = np.random.default_rng(2).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    network = Network(backbone, CPU, batch_size=2)
    rows = SimpleNamespace(images=images, activations=lambda layer: None)
    outputs = make_method("ash_layer", variant=variant, p=p, layer=layer).network_outputs(network, rows)
    with torch.no_grad():
        expected = BY_HAND[name, layer](model, backbone.preprocessing(images),
                                        lambda a: official_ash(a, variant, p)).double().numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-4, atol=1e-5 * scale)
    if name == "resnet50" and layer == "last_block" and variant != "p":
        # ASH after the block's ReLU (layer4's output, the old shaping layer) is another method: s1 lacks the
        # negative part of the sum. ASH-P is the same there whenever a sample has k positive values.
        after_relu = make_method("ash_layer", variant=variant, p=p, layer="layer4").network_outputs(network, rows)
        assert np.abs(after_relu["logits"] - expected).max() > 1e-2 * scale


def test_std_conv2d_standardises_each_filter():
    torch.manual_seed(0)
    conv = StdConv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(torch.arange(6.0).view(6, 1, 1, 1))
    weight = conv.weight.detach().double().numpy().reshape(6, -1)
    mean = weight.mean(axis=1, keepdims=True)
    variance = ((weight - mean) ** 2).mean(axis=1, keepdims=True)  # biased, as torch.var_mean(unbiased=False)
    standardised = (weight - mean) / np.sqrt(variance + 1e-10)
    np.testing.assert_allclose(standardised.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(standardised.var(axis=1), 1, atol=1e-9)
    x = torch.randn(2, 4, 8, 8)
    expected = F.conv2d(x, torch.from_numpy(standardised).float().view(6, 4, 3, 3), padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-5)


def group_norm_by_hand(h: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm from its definition: per sample and group of channels, (h - mean) / sqrt(biased var + eps),
    then the per-channel affine map."""
    n, c = h.shape[:2]
    groups = h.double().reshape(n, norm.num_groups, -1)
    mean = groups.mean(dim=2, keepdim=True)
    variance = ((groups - mean) ** 2).mean(dim=2, keepdim=True)
    normalised = ((groups - mean) / torch.sqrt(variance + norm.eps)).reshape(h.shape)
    shape = (1, c) + (1,) * (h.ndim - 2)
    return normalised * norm.weight.double().view(shape) + norm.bias.double().view(shape)


@pytest.fixture(scope="module")
def bit():
    """The registry BiT-S-R101x1 with random weights and group-norm parameters, fed 64x64 images."""
    torch.manual_seed(0)
    model = get_backbone_spec("bit-s-r101x1").build(num_classes=1000)
    randomise_norms(model)
    backbone = registered_backbone(get_backbone_spec("bit-s-r101x1"), model.state_dict(), "bit", 1000)
    backbone.preprocessing = Preprocessing(64, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # 480x480 is slow on a CPU
    return backbone


def test_bit_units_follow_the_resnet_v2_definition(bit):
    """A projection unit and an identity unit against BiT's pre-activation bottleneck written out."""
    def std(conv):
        weight = conv.weight
        return (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(
            weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-10)

    def unit_by_hand(unit, x, stride):
        a = F.relu(group_norm_by_hand(x, unit.gn1).float())
        shortcut = x if unit.downsample is None else F.conv2d(a, std(unit.downsample), stride=stride)
        out = F.conv2d(a, std(unit.conv1))
        out = F.conv2d(F.relu(group_norm_by_hand(out, unit.gn2).float()), std(unit.conv2), stride=stride, padding=1)
        out = F.conv2d(F.relu(group_norm_by_hand(out, unit.gn3).float()), std(unit.conv3))
        return out + shortcut

    torch.manual_seed(0)
    block2 = bit.model.body.block2
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block2.unit01(x), unit_by_hand(block2.unit01, x, 2), rtol=1e-4, atol=1e-4)
        y = torch.randn(2, 512, 4, 4)
        torch.testing.assert_close(block2.unit02(y), unit_by_hand(block2.unit02, y, 1), rtol=1e-4, atol=1e-4)
        root = bit.model.root
        image = torch.randn(1, 3, 32, 32)
        by_hand = F.max_pool2d(F.pad(F.conv2d(image, std(root.conv), stride=2, padding=3), (1, 1, 1, 1)), 3, 2)
        torch.testing.assert_close(root(image), by_hand, rtol=1e-5, atol=1e-5)
    assert block2.unit01.downsample is not None and block2.unit02.downsample is None
    assert bit.model.body.block1.unit01.downsample is not None  # 64 -> 256 channels at stride 1
    assert [len(bit.model.body[i]) for i in range(4)] == [3, 4, 23, 3]


BIT_MAHALANOBIS_LAYERS = ("root", "body.block1", "body.block2", "body.block3", "body.block4")


def test_bit_declares_the_root_and_its_four_stages():
    """BiT's Mahalanobis ensemble (GradNorm's code, METHODS.md 1.5(a)) uses five layers: the root
    (conv, pad, max pool) and the four stages, as ``intermediate_forward(x, 'all')`` returns them."""
    assert get_backbone_spec("bit-s-r101x1").layers == BIT_MAHALANOBIS_LAYERS


def test_bit_mahalanobis_ensemble_on_the_backbone_layers_is_root_plus_four_stages(bit):
    """layers='backbone' (the default) resolves to the root and the four stages, keys its outputs by
    them, and their spatial means have the root's 64 and the stages' 256 ... 2048 channels."""
    from methods.network_passes import layer_features

    ensemble = make_method("mahalanobis_ens")
    assert ensemble.layers == "backbone" and bit.declared()["layers"] == list(BIT_MAHALANOBIS_LAYERS)
    network = Network(bit, torch.device("cpu"), batch_size=2)
    assert ensemble.layer_names(network) == BIT_MAHALANOBIS_LAYERS
    assert ensemble.network_key(bit.declared())["layers"] == list(BIT_MAHALANOBIS_LAYERS)
    images = np.random.default_rng(0).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    features = layer_features(network, images, BIT_MAHALANOBIS_LAYERS)
    assert [features[layer].shape[1] for layer in BIT_MAHALANOBIS_LAYERS] == [64, 256, 512, 1024, 2048]
    with torch.no_grad():
        root = bit.model.root(bit.preprocessing(images)).double().mean(dim=(2, 3))
    np.testing.assert_allclose(features["root"], root.numpy(), rtol=1e-5, atol=1e-6)


def test_bit_features_are_the_pooled_group_norm_relu_output(bit):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    rows = forward_rows(bit, images, ("body.block4", "before_head.gn"), batch_size=3, device=torch.device("cpu"))
    block4 = torch.from_numpy(rows["body.block4"])
    assert block4.shape == (3, 2048, 2, 2)
    assert block4.min() < 0 < block4.max()  # the pre-activation sum of the last unit: signed
    assert rows["before_head.gn"].min() < 0 < rows["before_head.gn"].max()  # the shaping layer, before the ReLU
    with torch.no_grad():
        features = F.relu(group_norm_by_hand(block4, bit.model.before_head.gn)).mean(dim=(2, 3))
    assert rows["features"].shape == (3, 2048) and (rows["features"] >= 0).all()
    np.testing.assert_allclose(rows["features"], features.numpy(), rtol=1e-4, atol=1e-4)
    weight, bias = bit.head_parameters()
    assert weight.shape == (1000, 2048) and bias.shape == (1000,)
    np.testing.assert_allclose(rows["logits"], rows["features"] @ weight.T + bias, rtol=1e-4, atol=1e-4)
    # why the shaping layer is after the GroupNorm: a per-sample scale of block4's output is divided out again
    tail = lambda h: bit.model.head(bit.model.before_head(h))[..., 0, 0]  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(tail(3.0 * block4), tail(block4), rtol=1e-4, atol=1e-4)


def bit_npz_name(key: str) -> str:
    """The inverse of ``bit_npz_key``, written from bit_pytorch's ``load_from``."""
    top = {"root.conv.weight": "root_block/standardized_conv2d/kernel", "before_head.gn.weight": "group_norm/gamma",
           "before_head.gn.bias": "group_norm/beta", "head.conv.weight": "head/conv2d/kernel",
           "head.conv.bias": "head/conv2d/bias"}
    if key in top:
        return "resnet/" + top[key]
    _, block, unit, module, parameter = key.split(".")
    if module == "downsample":
        return f"resnet/{block}/{unit}/a/proj/standardized_conv2d/kernel"
    letter = "abc"[int(module[-1]) - 1]
    if module.startswith("conv"):
        return f"resnet/{block}/{unit}/{letter}/standardized_conv2d/kernel"
    return f"resnet/{block}/{unit}/{letter}/group_norm/{'gamma' if parameter == 'weight' else 'beta'}"


def test_load_bit_npz_round_trips(bit, tmp_path):
    torch.manual_seed(0)
    tiny = ResNetV2((1, 2, 1, 1), width_factor=1, num_classes=10)
    randomise_norms(tiny)
    state = tiny.state_dict()
    arrays = {bit_npz_name(key): value.numpy().transpose(2, 3, 1, 0) if value.ndim == 4 else value.numpy()
              for key, value in state.items()}  # OIHW -> HWIO
    assert arrays["resnet/block1/unit01/a/standardized_conv2d/kernel"].shape == (1, 1, 64, 64)
    assert arrays["resnet/head/conv2d/kernel"].shape == (1, 1, 2048, 10)
    path = tmp_path / "BiT-tiny.npz"
    np.savez(path, **arrays)
    loaded = load_bit_npz(path)
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    load_state_dict_strict(ResNetV2((1, 2, 1, 1), width_factor=1, num_classes=10), loaded, "BiT-tiny.npz")
    # every key of the registry's R101x1 has a name in the official file's naming
    for key in bit.model.state_dict():
        assert bit_npz_key(bit_npz_name(key)) == key
    with pytest.raises(ValueError, match="not a BiT ResNet-v2 array name"):
        bit_npz_key("resnet/block1/unit01/d/group_norm/gamma")


def test_bit_checkpoint_of_the_google_research_code_loads():
    """google-research's bit_pytorch keeps the final GroupNorm in ``head`` (``head.gn.*``); a checkpoint of it
    (``module.`` prefix already stripped by ``read_state_dict``) loads into the MOS / GradNorm layout."""
    torch.manual_seed(0)
    source = ResNetV2((1, 1, 1, 1), width_factor=1, num_classes=5)
    randomise_norms(source)
    state = {key.replace("before_head.gn.", "head.gn."): value for key, value in source.state_dict().items()}
    assert "head.gn.weight" in state and "before_head.gn.weight" not in state
    target = ResNetV2((1, 1, 1, 1), width_factor=1, num_classes=5)
    load_state_dict_strict(target, state, "bit_pytorch checkpoint")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("size", [(500, 300), (300, 500)])
def test_imagenet_decode_is_torchvision_evaluation_transform(size):
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    decoded = IMAGENET_NORM.decode(image)
    assert decoded.shape == (3, 224, 224)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-6)
    expected = transforms.Compose([transforms.Resize((480, 480)), transforms.ToTensor(),
                                   transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])(image)
    torch.testing.assert_close(BIT_NORM.decode(image), expected, rtol=0, atol=1e-6)
