"""Backbone registry: each architecture with its preprocessing and layer names next to it (timm habit).

A backbone is any ``nn.Module`` whose classifier head is one named module taking the
penultimate feature v (N, D) and returning logits f = W v + b (N, C). Extraction hooks that
head: its input is the cached ``features``, its output the cached ``logits``, and its
``weight``/``bias`` are the cached head (W, b). Inner layers are hooked by name for
``activations/<layer>``.

Weights come from a training recipe (``extract.training``) or a user checkpoint loaded with
``load_checkpoint_module`` (``module:factory`` plus a path, strict key check).
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.datasets import ImageFiles


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become network inputs: channel count, square input size, mean/std normalisation.

    Arrays arrive as uint8 [0,255] or float32 [0,1], (N,H,W) grayscale or (N,H,W,3) RGB. They are
    scaled to [0,1], converted to ``channels`` (grayscale->RGB by repetition, RGB->grayscale by
    ITU-R 601 luma), resized bilinearly (antialiased) to ``input_size`` when the size differs, and
    normalised per channel: x' = (x - mean) / std.

    Image files of varying sizes (``ImageFiles``: ImageNet-scale sets) are decoded one by one with
    Pillow (mode RGB or L, whose luma is ITU-R 601 too) and resized as torchvision's transforms
    do: with ``resize_to`` > 0, Resize(resize_to) (shorter side, bilinear, antialiased) then
    CenterCrop(input_size) - the ImageNet evaluation transform with 256/224; with 0,
    Resize((input_size, input_size)), the aspect ratio not kept (BiT's 480x480).
    """

    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_to: int = 0

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"preprocessing mean/std need {self.channels} values each, got mean={self.mean} std={self.std}"
            )
        if self.resize_to and self.resize_to < self.input_size:
            raise ValueError(f"preprocessing resize_to ({self.resize_to}) must be 0 or at least input_size "
                             f"({self.input_size}), as it is the size before the center crop")

    def describe(self) -> dict:
        described = {"input_size": self.input_size, "channels": self.channels,
                     "mean": list(self.mean), "std": list(self.std), "resize": "bilinear-antialias"}
        if self.resize_to:  # only when set, so the keys of every earlier preprocessing stay the same
            described["resize_to"] = self.resize_to
        return described

    def __call__(self, images) -> torch.Tensor:
        """Turn a batch of raw images (numpy, or ``ImageFiles``) into a normalised float32 tensor (N, C, H, W)."""
        if isinstance(images, ImageFiles):
            return torch.stack([self.decode(images.open(i)) for i in range(len(images))])
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[1] == 3 and self.channels == 1:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
        elif x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel of a [0,1] tensor (N, C, H, W) or (C, H, W)."""
        shape = (-1, 1, 1)
        return (x - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)

    def decode(self, image) -> torch.Tensor:
        """One Pillow image as a normalised (C, input_size, input_size) tensor (see the class docstring)."""
        from torchvision.transforms import functional as TF  # imported where used: torchvision is slow to import

        image = image.convert("RGB" if self.channels == 3 else "L")
        size = self.input_size
        if self.resize_to:
            image = TF.center_crop(TF.resize(image, self.resize_to, antialias=True), [size, size])
        else:
            image = TF.resize(image, [size, size], antialias=True)
        return self.normalise(TF.pil_to_tensor(image).float().div_(255.0))


@dataclass(frozen=True)
class BackboneSpec:
    """A registered architecture: how to build it, how to feed it, which module is the head."""

    name: str
    build: Callable[..., nn.Module]
    preprocessing: Preprocessing
    head: str
    layers: tuple[str, ...] = ()
    description: str = ""
    shaping_layer: str = ""  # where inner-layer activation shaping goes by default (ASH's "last block")


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, preprocessing: Preprocessing, head: str, layers=(), description="",
                      shaping_layer=""):
    """Decorator adding a model factory to ``BACKBONES`` under ``name``."""

    def add(build):
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = BackboneSpec(name, build, preprocessing, head, tuple(layers), description, shaping_layer)
        return build

    return add


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (no bias), batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class SmallCNN(nn.Module):
    """A small VGG-style CNN: conv blocks, global average pooling, one linear head.

    The penultimate feature is the pooled output of the last BN-ReLU block, so it is
    non-negative, as the shaping methods (ReAct, ASH, RG) assume.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.block1 = nn.Sequential(conv_bn_relu(in_channels, width), conv_bn_relu(width, width), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(conv_bn_relu(width, 2 * width), conv_bn_relu(2 * width, 2 * width),
                                    nn.MaxPool2d(2))
        self.block3 = conv_bn_relu(2 * width, 4 * width)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.block3(self.block2(self.block1(x)))))


class DigitsNet(nn.Module):
    """A tiny CNN for scikit-learn's 8x8 digits: two conv blocks, pooling, linear head."""

    def __init__(self, num_classes: int = 6, width: int = 16):
        super().__init__()
        self.block1 = conv_bn_relu(1, width)
        self.block2 = conv_bn_relu(width, 2 * width)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.block2(self.block1(x))))


# Fashion-MNIST train-set pixel mean and std.
FASHION_MNIST_NORM = Preprocessing(input_size=28, channels=1, mean=(0.2860,), std=(0.3530,))


# shaping_layer: the last conv block's batch norm output, before its final ReLU (ASH's placement
# in the last residual block of a ResNet, where values can be negative)
@register_backbone("cnn28", preprocessing=FASHION_MNIST_NORM, head="fc",
                   layers=("block1", "block2", "block3"), shaping_layer="block3.1",
                   description="small CNN for 28x28 grayscale (5 conv layers, 64-d GAP feature)")
def cnn28(num_classes: int = 10) -> nn.Module:
    return SmallCNN(in_channels=1, num_classes=num_classes, width=16)


@register_backbone("digits-net", preprocessing=Preprocessing(8, 1, (0.3,), (0.4,)), head="fc",
                   layers=("block1", "block2"), shaping_layer="block2.1",
                   description="tiny CNN for 8x8 digits (2 conv layers, 32-d GAP feature)")
def digits_net(num_classes: int = 6) -> nn.Module:
    return DigitsNet(num_classes=num_classes)


class OptionABlock(nn.Module):
    """He et al. (2016)'s CIFAR BasicBlock with the parameter-free "option A" shortcut: conv3x3
    (stride s) -> BN -> ReLU -> conv3x3 -> BN, plus the input (subsampled x[:, :, ::2, ::2] and
    zero-padded by planes/4 channels on each side when the shape changes), then ReLU. ``merge`` is
    the sum before the final ReLU (an identity module, so a hook can shape it: ASH's placement)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.merge = nn.Identity()
        self.pad = planes // 4 if stride != 1 or in_planes != planes else 0

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad else x
        return F.relu(self.merge(out + shortcut))


class CifarResNet(nn.Module):
    """The CIFAR ResNets of He et al. (2016) with option-A shortcuts (ResNet-20/32/44/56: n = 3, 5, 7,
    9 blocks per stage of 16, 32, 64 channels): conv1 -> bn1 -> ReLU -> 3 stages -> global average
    pooling -> 64-d feature -> ``linear``. Key names follow the public checkpoints."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(OptionABlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.linear(self.pool(self.layer3(self.layer2(self.layer1(out)))))


# the normalisation the public CIFAR-10 option-A checkpoints were trained with
CIFAR_RESNET_NORM = Preprocessing(input_size=32, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _register_cifar_resnet(depth: int) -> None:
    n = (depth - 2) // 6
    register_backbone(f"cifar-resnet{depth}", preprocessing=CIFAR_RESNET_NORM, head="linear",
                      layers=("layer1", "layer2", "layer3"), shaping_layer=f"layer3.{n - 1}.merge",
                      description=f"CIFAR ResNet-{depth}, option-A shortcuts (He et al. 2016), 64-d GAP feature")(
        lambda num_classes=10: CifarResNet(depth, num_classes))


for _depth in (20, 32, 44, 56):
    _register_cifar_resnet(_depth)


def _standard_init(model: nn.Module) -> None:
    """The initialisation of the public DenseNet and Wide ResNet code: conv weights N(0, 2/(k*k*out)),
    batch norm weight 1 and bias 0 (an affine one), linear bias 0 (training from scratch only; a
    checkpoint overwrites it)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class BottleneckBlock(nn.Module):
    """A DenseNet-BC layer: BN -> ReLU -> conv1x1 (4k channels) -> BN -> ReLU -> conv3x3 (k channels),
    dropout after each conv when ``drop_rate`` > 0 (train mode only); the k new channels are
    concatenated to the input. Key names follow the public CIFAR ``densenet.py`` (ODIN, energy_ood).
    ``bn_affine`` = False: batch norms without weight and bias (the UM code's NonAffineBatchNorm)."""

    def __init__(self, in_planes: int, growth_rate: int, drop_rate: float = 0.0, bn_affine: bool = True):
        super().__init__()
        inter_planes = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_planes, affine=bn_affine)
        self.conv1 = nn.Conv2d(in_planes, inter_planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter_planes, affine=bn_affine)
        self.conv2 = nn.Conv2d(inter_planes, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x):
        out = F.dropout(self.conv1(F.relu(self.bn1(x))), p=self.drop_rate, training=self.training)
        out = F.dropout(self.conv2(F.relu(self.bn2(out))), p=self.drop_rate, training=self.training)
        return torch.cat([x, out], 1)


class TransitionBlock(nn.Module):
    """A DenseNet transition: BN -> ReLU -> conv1x1 (compression) -> (dropout, as the public code) ->
    2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int, drop_rate: float = 0.0, bn_affine: bool = True):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes, affine=bn_affine)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x):
        out = F.dropout(self.conv1(F.relu(self.bn1(x))), p=self.drop_rate, training=self.training)
        return F.avg_pool2d(out, 2)


class DenseBlock(nn.Module):
    """``n`` bottleneck layers in ``layer`` (an ``nn.Sequential``), each adding ``growth_rate`` channels."""

    def __init__(self, n: int, in_planes: int, growth_rate: int, drop_rate: float = 0.0, bn_affine: bool = True):
        super().__init__()
        self.layer = nn.Sequential(*(BottleneckBlock(in_planes + i * growth_rate, growth_rate, drop_rate, bn_affine)
                                     for i in range(n)))

    def forward(self, x):
        return self.layer(x)


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32x32 inputs (Huang et al. 2017): conv3x3 3 -> 2k, three dense blocks of
    (depth - 4) / 6 bottleneck layers with growth rate k, a compressing transition (x ``reduction``,
    2x2 average pooling) after the first two, then BN (``bn1``) -> ReLU (``relu``) -> global average
    pooling -> ``fc``. Depth 100, k = 12: 24 -> 216 -> 108 -> 300 -> 150 -> 342 channels, a 342-d
    feature. Module names follow the public CIFAR ``densenet.py`` (DenseNet3 of ODIN / energy_ood).
    ``drop_rate``: dropout after every conv of the blocks and transitions (train mode only);
    ``bn_affine`` = False: every batch norm without weight and bias (the UM code's DenseNet)."""

    def __init__(self, depth: int = 100, growth_rate: int = 12, reduction: float = 0.5, num_classes: int = 10,
                 drop_rate: float = 0.0, bn_affine: bool = True):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a DenseNet-BC has depth 6n + 4 (40, 100, 190, ...), got {depth}")
        n = (depth - 4) // 6
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        self.block1 = DenseBlock(n, planes, growth_rate, drop_rate, bn_affine)
        planes += n * growth_rate
        self.trans1 = TransitionBlock(planes, int(planes * reduction), drop_rate, bn_affine)
        planes = int(planes * reduction)
        self.block2 = DenseBlock(n, planes, growth_rate, drop_rate, bn_affine)
        planes += n * growth_rate
        self.trans2 = TransitionBlock(planes, int(planes * reduction), drop_rate, bn_affine)
        planes = int(planes * reduction)
        self.block3 = DenseBlock(n, planes, growth_rate, drop_rate, bn_affine)
        planes += n * growth_rate
        self.bn1 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.relu = nn.ReLU()  # not in place: a hook on bn1 keeps its own output
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(planes, num_classes)
        self.in_planes = planes
        _standard_init(self)

    def forward(self, x):
        out = self.trans2(self.block2(self.trans1(self.block1(self.conv1(x)))))
        return self.fc(self.pool(self.relu(self.bn1(self.block3(out)))))


# the normalisation of the CIFAR DenseNet / ResNet-18 checkpoints of DICE, ASH, ReAct and KNN
CIFAR_NORM = Preprocessing(input_size=32, channels=3, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))


# shaping_layer: the final batch norm's output, before its ReLU (the end of the last dense block;
# values can be negative), the counterpart of ASH's placement in a ResNet's last block
@register_backbone("densenet-bc-100", preprocessing=CIFAR_NORM, head="fc",
                   layers=("conv1", "trans1", "trans2", "relu"), shaping_layer="bn1",
                   description="DenseNet-BC-100, k=12 (Huang et al. 2017), 342-d GAP feature; shaping at the "
                               "final BN (bn1) before its ReLU")
def densenet_bc_100(num_classes: int = 10, drop_rate: float = 0.0, bn_affine: bool = True) -> nn.Module:
    return DenseNetBC(depth=100, growth_rate=12, reduction=0.5, num_classes=num_classes, drop_rate=drop_rate,
                      bn_affine=bn_affine)


# the UM code's CIFAR normalisation (Hendrycks'), which its DenseNet applies inside its forward
UM_NORM = Preprocessing(input_size=32, channels=3, mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
                        std=(63.0 / 255, 62.1 / 255, 66.7 / 255))


@register_backbone("densenet-bc-100-um", preprocessing=UM_NORM, head="fc",
                   layers=("conv1", "trans1", "trans2", "relu"), shaping_layer="bn1",
                   description="DenseNet-BC-100 of the Unleashing Mask code (models/densenet.py with "
                               "NonAffineBatchNorm, droprate 0.3, Hendrycks' normalisation): 342-d GAP feature, "
                               "batch norms without weight and bias, dropout 0.3 in train mode")
def densenet_bc_100_um(num_classes: int = 10, drop_rate: float = 0.3, bn_affine: bool = False) -> nn.Module:
    return densenet_bc_100(num_classes, drop_rate, bn_affine)


class WideBasicBlock(nn.Module):
    """The pre-activation block of the Wide ResNet (Zagoruyko & Komodakis 2016): BN -> ReLU -> conv3x3
    (stride s) -> BN -> ReLU -> dropout (train mode only) -> conv3x3, plus the input; when the width
    changes, the shortcut is a 1x1 conv (``convShortcut``, stride s) of the pre-activated input.
    Key names follow the public ``wrn.py`` (Outlier Exposure, energy_ood)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                             if in_planes != out_planes else None)
        if self.convShortcut is None and stride != 1:
            raise ValueError("a Wide ResNet block with an identity shortcut cannot have stride != 1")

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = F.dropout(self.relu2(self.bn2(self.conv1(act))), p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """``n`` Wide ResNet blocks in ``layer``; the first changes the width and applies the stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1, drop_rate) for i in range(n)))

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: conv3x3 3 -> 16, three groups (``block1``-``block3``) of
    (depth - 4) / 6 blocks of widths 16k, 32k, 64k (strides 1, 2, 2), then BN (``bn1``) -> ReLU ->
    global average pooling -> 64k-d feature -> ``fc``."""

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10, drop_rate: float = 0.3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n + 4 (16, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()  # not in place: a hook on bn1 keeps its own output
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        self.nChannels = widths[3]
        _standard_init(self)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn1(out))))


# the normalisation of the Outlier Exposure / energy_ood WRN checkpoints (Hendrycks)
WRN_NORM = Preprocessing(input_size=32, channels=3, mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
                         std=(63.0 / 255, 62.1 / 255, 66.7 / 255))


def _register_wrn(depth: int, k: int) -> None:
    register_backbone(f"wrn-{depth}-{k}", preprocessing=WRN_NORM, head="fc",
                      layers=("block1", "block2", "block3"), shaping_layer="bn1",
                      description=f"WRN-{depth}-{k} (Zagoruyko & Komodakis 2016; OE's wrn.py), dropout 0.3 (train "
                                  f"mode), {64 * k}-d GAP feature; shaping at the final BN (bn1) before its ReLU")(
        lambda num_classes=10, drop_rate=0.3: WideResNet(depth, k, num_classes, drop_rate))


for _k in (2, 4):
    _register_wrn(40, _k)


class ProjectionBlock(nn.Module):
    """The CIFAR ResNet-18 BasicBlock (kuangliu-style, as ReAct / KNN): conv3x3 (stride s) -> BN -> ReLU
    -> conv3x3 -> BN, plus ``shortcut`` (empty, or 1x1 conv (stride s) + BN when the shape changes),
    then ReLU. ``merge`` is the sum before the final ReLU (an identity module for a shaping hook)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.merge = nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.merge(out + self.shortcut(x)))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: conv3x3 3 -> 64 (stride 1, no max pooling) -> bn1 -> ReLU ->
    ``layer1``-``layer4`` of 2 blocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2) -> global
    average pooling -> 512-d feature -> ``linear``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(ProjectionBlock(in_planes, planes, stride), ProjectionBlock(planes, planes)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.linear(self.pool(self.layer4(self.layer3(self.layer2(self.layer1(out))))))


@register_backbone("cifar-resnet18", preprocessing=CIFAR_NORM, head="linear",
                   layers=("layer1", "layer2", "layer3", "layer4"), shaping_layer="layer4.1.merge",
                   description="CIFAR ResNet-18 (3x3 stem, no max pooling; ReAct/KNN), 512-d GAP feature")
def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    return CifarResNet18(num_classes=num_classes)


class SigmoidGELU(nn.Module):
    """The sigmoid approximation of GELU used by the Outlier Exposure MNIST code: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OEConvNet(nn.Module):
    """The MNIST ConvNet of Outlier Exposure (Hendrycks et al. 2019, ``MNIST/models/conv_net.py``):
    conv1 5x5 1->10 -> max-pool 2 -> act; conv2 5x5 10->20 -> dropout2d -> max-pool 2 -> act;
    flatten 320 -> fc1 50 -> act (the penultimate feature; it can be slightly negative) -> dropout
    -> fc2 10. act is ``SigmoidGELU``; the dropouts are identities in eval mode. Each step is a
    module so hooks can read (``act1``, ``act2``, ``act3``) or shape (``act2``) it."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.act1 = SigmoidGELU()
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.conv2_drop = nn.Dropout2d()
        self.pool2 = nn.MaxPool2d(2)
        self.act2 = SigmoidGELU()
        self.fc1 = nn.Linear(320, 50)
        self.act3 = SigmoidGELU()
        self.fc1_drop = nn.Dropout()
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x):
        x = self.act1(self.pool1(self.conv1(x)))
        x = self.act2(self.pool2(self.conv2_drop(self.conv2(x))))
        return self.fc2(self.fc1_drop(self.act3(self.fc1(x.flatten(1)))))


# shaping_layer: the activated conv2 map (>= -0.17, as x * sigmoid(1.702 x) is). Before the activation
# it is signed, and ASH-S's exp(sum / kept sum) overflows there (measured: 88 of 10,000 notMNIST images).
@register_backbone("mnist-convnet-oe", preprocessing=Preprocessing(28, 1, (0.0,), (1.0,)), head="fc2",
                   layers=("act1", "act2", "act3"), shaping_layer="act2",
                   description="Outlier Exposure's MNIST ConvNet (2 conv + 2 fc, x*sigmoid(1.702x)), 50-d fc1 "
                               "feature; inputs in [0,1], no normalisation")
def mnist_convnet_oe(num_classes: int = 10) -> nn.Module:
    return OEConvNet(num_classes=num_classes)


# ImageNet backbones of the OOD papers: ResNet-50 (ReAct, DICE, ASH, KNN, ViM), MobileNetV2 (ReAct, ASH),
# DenseNet-121 (ASH's code) and BiT-S-R101x1 (MOS, GradNorm, ViM). torchvision is imported inside the factories:
# it is slow to import.

# torchvision's ImageNet evaluation transform: Resize(256) -> CenterCrop(224) -> normalise
IMAGENET_NORM = Preprocessing(input_size=224, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              resize_to=256)


class BottleneckWithMerge(nn.Module):
    """torchvision's ResNet ``Bottleneck`` (conv1x1 -> BN -> ReLU -> conv3x3 (stride s) -> BN -> ReLU -> conv1x1
    -> BN, plus the input or ``downsample`` of it, then ReLU) with the sum before its final ReLU passed through
    ``merge``, an identity module, so a hook can read or shape it (torchvision's block runs one ``relu`` module
    three times and has no module for the sum). That sum is where the official ASH code shapes a ResNet's last
    block (its Bottleneck with ``use_ash``: ``out += identity``, ASH, ReLU).

    Built from a torchvision block, whose modules it takes over: the same parameters, state-dict keys (in the
    same order) and outputs. The final ReLU is not in place, so a captured ``merge`` output stays the signed sum.
    It prints as torchvision's Bottleneck, ``merge`` left out (no parameters, no computation): ``repr(model)`` is
    part of ``Backbone.key``, so the cache keys of ResNet-50 entries stay those of torchvision's model."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, module in block.named_children():
            self.add_module(name, module)
        self.downsample = block.downsample  # None (a plain attribute, as in torchvision) or its registered module
        self.stride = block.stride
        self.merge = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.merge(out + identity))

    def _get_name(self) -> str:
        return "Bottleneck"

    def __repr__(self) -> str:
        shown = copy.copy(self)  # a shallow copy without ``merge``: torchvision's own repr of the block
        shown._modules = {name: module for name, module in self._modules.items() if name != "merge"}
        return nn.Module.__repr__(shown)


# shaping_layer: the last bottleneck's sum before its final ReLU (``layer4.2.merge``, (N, 2048, 7, 7), signed), the
# official ASH code's in-block placement (its Bottleneck with use_ash; switched off in every commit of that code,
# whose ImageNet results shape the pooled 2048-d feature instead: the cache-only ash_* methods, or ash_layer with
# layer=penultimate). layer4's output is that sum after the ReLU, unchanged.
@register_backbone("resnet50", preprocessing=IMAGENET_NORM, head="fc",
                   layers=("layer1", "layer2", "layer3", "layer4"), shaping_layer="layer4.2.merge",
                   description="ResNet-50 (He et al. 2016; torchvision, v1 weights resnet50-19c8e357.pth, 76.13% "
                               "top-1), 2048-d GAP feature; shaping at the last bottleneck's sum before its ReLU "
                               "(layer4.2.merge)")
def resnet50(num_classes: int = 1000) -> nn.Module:
    from torchvision import models

    model = models.resnet50(weights=None, num_classes=num_classes)
    model.layer4[-1] = BottleneckWithMerge(model.layer4[-1])
    return model


# layers: the ends of the 24-, 32- and 96-channel stages (strides 4, 8, 16; linear bottlenecks, so signed) and
# the final 1280-channel map. shaping_layer: features.18, the last 1x1 conv block (320 -> 1280, BN, ReLU6), so
# values lie in [0, 6]; torchvision's forward only average-pools it into the head (no further activation).
# The official ASH code shapes MobileNetV2 only at the pooled 1280-d feature before the classifier (ash_* or
# ash_layer with layer=penultimate); it has no in-block placement here. features.18 is the counterpart of the
# ResNet one, but after the ReLU6, not before it: a ReLU6 after the shaping would clip ASH-S's and ASH-B's
# rescaled values at 6.
@register_backbone("mobilenet-v2", preprocessing=IMAGENET_NORM, head="classifier.1",
                   layers=("features.3", "features.6", "features.13", "features.18"), shaping_layer="features.18",
                   description="MobileNetV2 (Sandler et al. 2018; torchvision, weights mobilenet_v2-b0353104.pth), "
                               "1280-d GAP feature; shaping at the last conv block (ReLU6 output, in [0, 6])")
def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    from torchvision import models

    return models.mobilenet_v2(weights=None, num_classes=num_classes)


def remap_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's published DenseNet checkpoints (densenet121-a639ec97.pth) name a dense layer's modules
    ``norm.1``, ``conv.1``, ... (dots are no longer allowed in module names); rename them ``norm1``, ``conv1``, ...
    with the pattern of ``torchvision.models.densenet._load_state_dict``. Other keys are kept, in order."""
    import re

    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                         r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    renamed = {}
    for key, value in state.items():
        match = pattern.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


class DenseNet121(nn.Module):
    """torchvision's DenseNet-121 (Huang et al. 2017: growth rate 32, dense blocks of 6, 12, 24, 16 layers):
    its ``features`` and ``classifier`` modules, so its key names, with torchvision's forward written out:
    features (ending in the batch norm ``features.norm5``) -> ReLU -> global average pooling -> 1024-d feature
    -> ``classifier``. The ReLU is not in place (torchvision's is), so a hook on ``features.norm5`` keeps the
    signed batch-norm output. Checkpoints with the old dotted key names load (``remap_state_dict``)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        from torchvision import models

        reference = models.densenet121(weights=None, num_classes=num_classes)
        self.features = reference.features
        self.classifier = reference.classifier

    def forward(self, x):
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(out, 1))

    @staticmethod
    def remap_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called by ``load_state_dict_strict`` before it compares keys."""
        return remap_densenet_keys(state)


# shaping_layer: the final batch norm's output, before the ReLU and pooling (signed), as for densenet-bc-100: the
# counterpart of the ResNet placement (the last map before the final ReLU). The official ASH code
# (densenet_imagenet.py) shapes DenseNet-121 only at the pooled 1024-d feature after that ReLU (ASH-S@99; ash_* or
# ash_layer with layer=penultimate).
@register_backbone("densenet121", preprocessing=IMAGENET_NORM, head="classifier",
                   layers=("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.norm5"),
                   shaping_layer="features.norm5",
                   description="DenseNet-121 (Huang et al. 2017; torchvision, weights densenet121-a639ec97.pth, old "
                               "key names renamed), 1024-d GAP feature; shaping at the final BN (norm5) before its "
                               "ReLU")
def densenet121(num_classes: int = 1000) -> nn.Module:
    return DenseNet121(num_classes=num_classes)


def named_sequential(**modules: nn.Module) -> nn.Sequential:
    """An ``nn.Sequential`` whose children have the given names, in keyword order."""
    sequential = nn.Sequential()
    for name, module in modules.items():
        sequential.add_module(name, module)
    return sequential


class StdConv2d(nn.Conv2d):
    """A convolution with weight standardisation (Qiao et al. 2019), as Big Transfer uses it: each output
    filter's weights are standardised to zero mean and unit (biased) variance, eps 1e-10, at every call."""

    def forward(self, x):
        variance, mean = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(variance + 1e-10)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PreActBottleneck(nn.Module):
    """BiT's pre-activation (v2) bottleneck unit: a = ReLU(gn1(x)); out = conv1 1x1 (cin -> cmid) -> gn2 -> ReLU
    -> conv2 3x3 (stride s) -> gn3 -> ReLU -> conv3 1x1 (cmid -> cout), plus the shortcut: x, or ``downsample``
    (1x1, stride s) of a when the shape changes. No activation after the sum. GroupNorm(32), StdConv2d."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cin)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(32, cmid)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        out = self.relu(self.gn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv2(self.relu(self.gn2(self.conv1(out))))
        return self.conv3(self.relu(self.gn3(out))) + shortcut


class ResNetV2(nn.Module):
    """Big Transfer's ResNet-v2 (Kolesnikov et al. 2020), module names of google-research/big_transfer
    ``bit_pytorch/models.py`` as split by the MOS / GradNorm code (``before_head`` + ``head``), so their
    checkpoints load: ``root`` (StdConv2d 7x7 stride 2, zero padding 1, 3x3 max pooling stride 2), ``body``
    of ``block1``-``block4`` with ``unit01``... (256, 512, 1024, 2048 times ``width_factor`` channels, the
    first unit of blocks 2-4 with stride 2), ``before_head`` (``gn`` -> ``relu`` -> ``avg``: the 2048-d
    pooled feature) and ``head`` (``conv``: a 1x1 convolution with bias, the classifier).

    ``block4``'s output is the pre-activation sum, signed; the GroupNorm after it divides out any per-sample
    scale, so shaping is placed after it, at ``before_head.gn`` (signed; ReLU and pooling follow)."""

    def __init__(self, block_units=(3, 4, 23, 3), width_factor: int = 1, num_classes: int = 1000):
        super().__init__()
        wf = width_factor
        # zero padding then an unpadded pool: the root output is not activated, so the pool's own -inf
        # padding would give different border values
        self.root = named_sequential(conv=StdConv2d(3, 64 * wf, 7, stride=2, padding=3, bias=False),
                                     pad=nn.ConstantPad2d(1, 0), pool=nn.MaxPool2d(3, stride=2, padding=0))
        blocks, cin = {}, 64 * wf
        for b, units in enumerate(block_units):
            cout, cmid = 256 * wf * 2 ** b, 64 * wf * 2 ** b
            blocks[f"block{b + 1}"] = named_sequential(**{
                f"unit{u:02d}": PreActBottleneck(cin if u == 1 else cout, cout, cmid, 2 if u == 1 and b > 0 else 1)
                for u in range(1, units + 1)})
            cin = cout
        self.body = named_sequential(**blocks)
        self.before_head = named_sequential(gn=nn.GroupNorm(32, cin),
                                            relu=nn.ReLU(),  # not in place: a hook on gn keeps its own output
                                            avg=nn.AdaptiveAvgPool2d(1))
        self.head = named_sequential(conv=nn.Conv2d(cin, num_classes, 1, bias=True))

    def forward(self, x):
        return self.head(self.before_head(self.body(self.root(x))))[..., 0, 0]

    @staticmethod
    def remap_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """google-research's own code keeps the final GroupNorm in ``head`` (``head.gn.*``); called by
        ``load_state_dict_strict`` before it compares keys, this renames those keys ``before_head.gn.*``."""
        return {("before_head." + key[len("head."):] if key.startswith("head.gn.") else key): value
                for key, value in state.items()}


# The official BiT .npz names (TF) of the top-level arrays and of a unit's arrays, and their torch keys,
# as ``ResNetV2.load_from`` / ``PreActBottleneck.load_from`` of bit_pytorch/models.py copy them.
BIT_NPZ_TOP = {"root_block/standardized_conv2d/kernel": "root.conv.weight",
               "group_norm/gamma": "before_head.gn.weight", "group_norm/beta": "before_head.gn.bias",
               "head/conv2d/kernel": "head.conv.weight", "head/conv2d/bias": "head.conv.bias"}
BIT_NPZ_UNIT = {"a/standardized_conv2d/kernel": "conv1.weight", "b/standardized_conv2d/kernel": "conv2.weight",
                "c/standardized_conv2d/kernel": "conv3.weight",
                "a/proj/standardized_conv2d/kernel": "downsample.weight",
                "a/group_norm/gamma": "gn1.weight", "a/group_norm/beta": "gn1.bias",
                "b/group_norm/gamma": "gn2.weight", "b/group_norm/beta": "gn2.bias",
                "c/group_norm/gamma": "gn3.weight", "c/group_norm/beta": "gn3.bias"}


def bit_npz_key(name: str) -> str:
    """The ``ResNetV2`` state-dict key of one array of an official BiT .npz, e.g.
    ``resnet/block1/unit01/a/group_norm/gamma`` -> ``body.block1.unit01.gn1.weight``."""
    prefix, _, rest = name.partition("/")
    if prefix == "resnet" and rest in BIT_NPZ_TOP:
        return BIT_NPZ_TOP[rest]
    block, _, rest = rest.partition("/")
    unit, _, part = rest.partition("/")
    if prefix != "resnet" or not block.startswith("block") or not unit.startswith("unit") or part not in BIT_NPZ_UNIT:
        raise ValueError(f"not a BiT ResNet-v2 array name: {name!r}")
    return f"body.{block}.{unit}.{BIT_NPZ_UNIT[part]}"


def load_bit_npz(path: str | Path) -> dict[str, torch.Tensor]:
    """An official BiT checkpoint (e.g. BiT-S-R101x1.npz, TF names and HWIO kernels) as a ``ResNetV2`` state
    dict: every array under ``bit_npz_key``, 4-d kernels transposed to OIHW (``tf2th`` of bit_pytorch)."""
    state = {}
    with np.load(path) as arrays:
        for name in arrays.files:
            array = arrays[name]
            state[bit_npz_key(name)] = torch.from_numpy(np.ascontiguousarray(
                array.transpose(3, 2, 0, 1) if array.ndim == 4 else array))
    return state


# BiT's fine-tuning and OOD evaluation resolution (MOS, GradNorm): Resize((480, 480)), the aspect ratio not kept
BIT_NORM = Preprocessing(input_size=480, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# shaping_layer: before_head.gn, the final GroupNorm's output before its ReLU (signed), as the WRN's bn1 in
# the same pre-activation layout. Not body.block4: GN(c * h) = GN(h) for any per-sample c > 0, so ASH-S's and
# ASH-B's rescaling there would be divided out again. The official ASH code has no BiT model; this is the
# counterpart of its ResNet placement (the last map before the final ReLU).
# layers: the root (conv, pad, max pool) and the four stages, GradNorm's five Mahalanobis layers (its
# ResNetV2.intermediate_forward 'all'; METHODS.md 1.5(a)), what mahalanobis_ens's layers='backbone' stands for.
@register_backbone("bit-s-r101x1", preprocessing=BIT_NORM, head="head.conv",
                   layers=("root", "body.block1", "body.block2", "body.block3", "body.block4"),
                   shaping_layer="before_head.gn",
                   description="BiT-S-R101x1 (Kolesnikov et al. 2020; MOS, GradNorm): ResNet-v2 101, GroupNorm + "
                               "weight standardisation, 480x480 inputs, 2048-d GAP feature, 1x1-conv head; weights "
                               "BiT-S-R101x1.npz via load_bit_npz; shaping at the final GN before its ReLU")
def bit_s_r101x1(num_classes: int = 1000) -> nn.Module:
    return ResNetV2((3, 4, 23, 3), width_factor=1, num_classes=num_classes)


def get_backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone architecture {name!r}; registered: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


class CheckpointMismatch(ValueError):
    """A checkpoint's keys do not match the architecture it is loaded into."""


class CheckpointUnreadable(ValueError):
    """A checkpoint file that is not a checkpoint: empty, truncated, random bytes, or a pickle of
    Python objects that ``torch.load(weights_only=True)`` refuses to run."""


TORCH_LOAD_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _load_checkpoint_file(path: Path):
    """``torch.load`` of a user checkpoint (``np.load`` of an ``.npz``), its failures turned into one
    ``CheckpointUnreadable`` naming the file and what is wrong with it."""
    if path.stat().st_size == 0:
        raise CheckpointUnreadable(f"checkpoint {path} is empty (0 bytes); copy or download it again")
    try:
        with warnings.catch_warnings():  # torch warns of odd pickle protocols on its way to the error below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return load_bit_npz(path) if path.suffix == ".npz" else torch.load(path, map_location="cpu",
                                                                               weights_only=True)
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # the line of torch's message that says what is wrong, past its boilerplate on weights_only
        detail = next((line for line in lines if not line.startswith(TORCH_LOAD_BOILERPLATE)), type(err).__name__)
        if "GLOBAL" in detail:  # the weights-only unpickler refused an object
            reason = (f"it holds Python objects other than tensors ({detail}), which oodbench does not unpickle "
                      "(unpickling can run arbitrary code); if you trust its source, load it yourself and save its "
                      "state_dict() with torch.save")
        else:
            reason = (f"it is not a {'NumPy .npz' if path.suffix == '.npz' else 'PyTorch'} file of tensors, or is "
                      f"truncated ({detail}); copy or download it again")
        raise CheckpointUnreadable(f"checkpoint {path} cannot be loaded: {reason}") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file: a plain state dict, or a dict with a ``state_dict``/``model`` entry;
    an ``.npz`` is Big Transfer's official release format (``load_bit_npz``). A file that cannot
    be loaded is a ``CheckpointUnreadable``.

    A ``module.`` prefix on every key (``nn.DataParallel`` checkpoints) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = _load_checkpoint_file(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointUnreadable(f"checkpoint {path} does not hold a state dict of tensors (nor one under "
                                   "'state_dict'/'model')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, raising one error that lists missing, unexpected and mis-shaped keys.

    Checkpoints saved before PyTorch 0.4.1 have no batch-norm ``num_batches_tracked`` counters (e.g.
    the public CIFAR option-A ResNets); those alone are taken from the model (the counter only
    matters for training with momentum=None)."""
    if hasattr(model, "remap_state_dict"):  # published checkpoints with older key names (DenseNet121, ResNetV2)
        state = model.remap_state_dict(state)
    expected = model.state_dict()
    state = {**{k: v for k, v in expected.items() if k.endswith(".num_batches_tracked") and k not in state}, **state}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not fit {type(model).__name__}:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): {', '.join(keys)}")
        lines.append("  check the factory (module:factory and its kwargs) matches the checkpoint's architecture")
        raise CheckpointMismatch("\n".join(lines))
    model.load_state_dict(state, strict=True)


def import_factory(ref: str) -> Callable[..., nn.Module]:
    """Resolve ``'package.module:function'`` to the callable; any failure is one ``ValueError``."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must look like 'package.module:function', got {ref!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises while it is imported
        raise ValueError(f"cannot import module {module_name!r} for factory {ref!r}: "
                         f"{type(err).__name__}: {err}") from err
    if not hasattr(module, attr):
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (factory {ref!r})")
    factory = getattr(module, attr)
    if not callable(factory):
        raise ValueError(f"factory {ref!r} is a {type(factory).__name__}, not a function or class that builds "
                         "the model")
    return factory


def build_from_factory(ref: str, kwargs: dict) -> nn.Module:
    """The model ``ref``'s factory builds with ``kwargs``; one ``ValueError`` naming the factory when
    it raises or returns something other than an ``nn.Module``."""
    factory = import_factory(ref)
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise ValueError(f"factory {ref!r} raised {type(err).__name__} when called with kwargs {kwargs}: "
                         f"{err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory {ref!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def weights_digest(model: nn.Module) -> str:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes) in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Backbone:
    """A concrete backbone entry: a model with weights, its preprocessing, head and layer names.

    ``key`` is the content hash of the weights, architecture and preprocessing: the cache's
    identity for this entry (a change to any of them is a different entry).
    """

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    head: str
    layers: tuple[str, ...]
    architecture: dict
    info: dict = field(default_factory=dict)
    shaping_layer: str = ""  # the default inner layer of activation shaping (``methods.network_scores.LAST_BLOCK``)

    def __post_init__(self):
        self.model.eval()
        modules = dict(self.model.named_modules())
        for layer in (self.head, *self.layers, *([self.shaping_layer] if self.shaping_layer else [])):
            if layer not in modules:
                raise ValueError(f"backbone {self.name!r} has no module named {layer!r}; "
                                 f"modules: {', '.join(n for n in modules if n)}")
        head = modules[self.head]
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError(f"head module {self.head!r} of backbone {self.name!r} has no weight tensor")
        identity = {"architecture": self.architecture, "module": repr(self.model),
                    "preprocessing": self.preprocessing.describe(), "head": self.head,
                    "weights": weights_digest(self.model)}
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def head_parameters(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) of the head as float32 arrays, W reshaped to (C, D) (a 1x1 conv head becomes C x D)."""
        head = dict(self.model.named_modules())[self.head]
        weight = head.weight.detach().cpu().float()
        weight = weight.reshape(weight.shape[0], -1)
        bias = head.bias.detach().cpu().float() if head.bias is not None else torch.zeros(weight.shape[0])
        return weight.numpy(), bias.numpy()

    def declared(self) -> dict:
        """The layers this backbone declares, which symbolic layer parameters of network methods
        ('last_block', 'backbone') stand for: part of those methods' cache keys."""
        return {"shaping_layer": self.shaping_layer, "layers": list(self.layers)}

    def describe(self) -> dict:
        return {"name": self.name, "key": self.key, "architecture": self.architecture,
                "preprocessing": self.preprocessing.describe(), "head": self.head,
                "layers": list(self.layers), "shaping_layer": self.shaping_layer, **self.info}


def registered_backbone(spec: BackboneSpec, state: dict[str, torch.Tensor], name: str,
                        num_classes: int, info: dict | None = None) -> Backbone:
    """A registry architecture with the given weights (e.g. trained by the harness)."""
    model = spec.build(num_classes=num_classes)
    load_state_dict_strict(model, state, source=name)
    return Backbone(name, model, spec.preprocessing, spec.head, spec.layers,
                    {"registry": spec.name, "num_classes": num_classes}, info or {}, spec.shaping_layer)


def checkpoint_backbone(name: str, factory: str, checkpoint: str | Path, preprocessing: Preprocessing,
                        head: str, layers=(), kwargs: dict | None = None, shaping_layer: str = "") -> Backbone:
    """A user model: ``factory`` ('module:function') builds it, ``checkpoint`` supplies the weights."""
    kwargs = dict(kwargs or {})
    model = build_from_factory(factory, kwargs)
    load_state_dict_strict(model, read_state_dict(checkpoint), source=str(checkpoint))
    return Backbone(name, model, preprocessing, head, tuple(layers),
                    {"factory": factory, "kwargs": kwargs}, {"checkpoint": str(checkpoint)}, shaping_layer)


def preprocessing_from_config(config: dict) -> Preprocessing:
    """Build ``Preprocessing`` from a benchmark file's mapping (input_size, channels, mean, std;
    optional resize_to)."""
    known = {"input_size", "channels", "mean", "std"}
    unknown = set(config) - known - {"resize_to"}
    if unknown or not known <= set(config):
        raise ValueError(f"preprocessing needs {sorted(known)} (and optionally resize_to); got {sorted(config)}")
    return Preprocessing(int(config["input_size"]), int(config["channels"]),
                         tuple(float(m) for m in config["mean"]), tuple(float(s) for s in config["std"]),
                         int(config.get("resize_to", 0)))


def spec_summary(spec: BackboneSpec) -> dict:
    """What the registry says about one architecture (for the CLI listing)."""
    return {"name": spec.name, "head": spec.head, "layers": list(spec.layers), "shaping_layer": spec.shaping_layer,
            "preprocessing": asdict(spec.preprocessing), "description": spec.description}
