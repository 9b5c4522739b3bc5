"""Model registry: named entries over timm (each with the options it takes and the adaptation it
records; a second entry of one name is refused), one `create_model` factory, `pretrained=False` always.

ResNets are initialised as torchvision initialises them (no zero-initialised last BN gamma), the
models the official SRe2L/CDA teachers and students are. Small-image adaptations are explicit and
recorded (`describe_adaptation`):
- ResNets at <= 64 px: 3x3 stride-1 `conv1` and no max-pool (the field's CIFAR/Tiny ResNet).
- MobileNetV2 at <= 64 px: stride-1 `conv_stem`, so the last feature map is not 1x1 at 32 px; below
  32 px the first downsampling stages also keep stride 1 until the last map is 2x2 again (at 8 px
  the stock strides leave every stage after the third at 1x1, and it learns far more slowly:
  docs/digits.md).
- DeiT: the patch size is chosen for an 8x8 token grid at small sizes (224 px keeps 16 -> 14x14);
  a task may set another (`patch_size`, e.g. 4 at 8 px: a 2x2 grid, 8x cheaper than patch 1).
Any other name is passed to timm as it is.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import timm
import torch
from torch import nn

SMALL_IMAGE_MAX = 64


@dataclass(frozen=True)
class ModelEntry:
    name: str
    timm_name: str
    build: Callable[..., nn.Module]      # build(timm_name, num_classes, in_chans, image_size, **options)
    description: str
    describe: Callable[..., str]         # describe(timm_name, image_size, **options): the recorded adaptation
    options: tuple[str, ...] = ()        # the keyword options it takes: patch_size, zero_init_residual


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, timm_name: str, description: str, describe: Callable[..., str],
                   options: tuple[str, ...] = ()):
    """Decorator registering `build` under `name`; a name already registered is refused (a second
    entry would silently change what every record of that name measured)."""
    def wrap(build):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered ({MODELS[name].description}): pick another name")
        MODELS[name] = ModelEntry(name, timm_name, build, description, describe, options)
        return build
    return wrap


def _small_resnet(model: nn.Module, in_chans: int, image_size: int) -> nn.Module:
    if image_size <= SMALL_IMAGE_MAX:
        model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _resnet(timm_name, num_classes, in_chans, image_size, zero_init_residual=False):
    # torchvision's initialisation, as the official teachers and students have: Kaiming-normal
    # convolutions, BN gamma 1 everywhere. `zero_init_residual` (torchvision's option of the same
    # name; timm's default) zero-initialises the last BN gamma of every block instead: a recipe
    # choice for short schedules (the embedded digits tasks), never the papers'. timm's ResNet keys
    # equal torchvision's, so a `torchvision.models.resnet18` state dict loads as it is.
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              zero_init_last=zero_init_residual)
    return _small_resnet(model, in_chans, image_size)


def _describe_resnet(timm_name: str, image_size: int, zero_init_residual: bool = False) -> str:
    init = ", zero-init residual BN" if zero_init_residual else ", torchvision init"
    stem = "stock stem" if image_size > SMALL_IMAGE_MAX else "3x3 stride-1 stem, no max-pool"
    return f"{timm_name}, {stem}{init}"


for _depth in (18, 50, 101):
    register_model(f"resnet{_depth}", f"resnet{_depth}",
                   "timm ResNet with torchvision's init; 3x3 stride-1 stem, no max-pool at <= 64 px",
                   _describe_resnet, options=("zero_init_residual",))(_resnet)


def _describe_mobilenetv2(timm_name: str, image_size: int) -> str:
    if image_size > SMALL_IMAGE_MAX:
        return f"{timm_name}, stock stem"
    stages = mobilenetv2_stride1_stages(image_size)
    return f"{timm_name}, stride-1 stem" + (f", stride-1 stages {stages}" if stages else "")


@register_model("mobilenetv2", "mobilenetv2_100", "timm MobileNetV2 1.0; stride-1 stem at <= 64 px",
                _describe_mobilenetv2)
def _mobilenetv2(timm_name, num_classes, in_chans, image_size):
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if image_size <= SMALL_IMAGE_MAX:
        old = model.conv_stem
        model.conv_stem = type(old)(in_chans, old.out_channels, old.kernel_size, stride=1,
                                    padding=old.padding, bias=False)
        for stage in mobilenetv2_stride1_stages(image_size):
            model.blocks[stage][0].conv_dw.stride = (1, 1)
    return model


def mobilenetv2_stride1_stages(image_size: int) -> list[int]:
    """Stages (after a stride-1 stem) whose first block loses its stride, earliest first, so the
    last feature map stays at least 2x2 (the stock network downsamples 16x after the stem)."""
    stages, side = [], image_size / 16
    for stage in (1, 2, 3, 5):  # the stride-2 stages of MobileNetV2
        if side >= 2:
            break
        stages.append(stage)
        side *= 2
    return stages


def deit_patch_size(image_size: int) -> int:
    """16 at >= 224 px (the original 14x14 grid); otherwise a patch that gives an 8x8 grid."""
    if image_size >= 224:
        return 16
    return max(1, image_size // 8)


def _describe_deit(timm_name: str, image_size: int, patch_size: int | None = None) -> str:
    return f"{timm_name}, img_size {image_size}, patch {patch_size or deit_patch_size(image_size)}"


@register_model("deit_tiny", "deit_tiny_patch16_224", "timm DeiT-Tiny; patch = size/8 below 224 px", _describe_deit,
                options=("patch_size",))
def _deit_tiny(timm_name, num_classes, in_chans, image_size, patch_size=None):
    patch = patch_size or deit_patch_size(image_size)
    if image_size % patch:
        raise ValueError(f"patch_size {patch} does not divide the image size {image_size}: pick a divisor")
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                             img_size=image_size, patch_size=patch)


# ---------------------------------------------------------------- the small-data panel
# The four families of the cross-architecture panel at widths sized for data far smaller than
# ImageNet's (the embedded 8x8 digits), as the CIFAR ResNets are (16 base channels): a named
# deviation that a task opts into (its `panel`); the papers' tasks keep the standard models above.
# At 8 px a standard-width step is compute-bound and these are 3-6x cheaper (docs/digits-narrow-panel.md).

def _narrow_resnet(timm_name, num_classes, in_chans, image_size, width=16, zero_init_residual=False):
    channels = tuple(width * 2 ** i for i in range(4))
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              channels=channels, stem_width=width, zero_init_last=zero_init_residual)
    return _small_resnet(model, in_chans, image_size)


def _describe_narrow_resnet(timm_name, image_size, width=16, zero_init_residual=False):
    return _describe_resnet(timm_name, image_size, zero_init_residual) + f", base width {width} (standard 64)"


for _depth, _width in ((18, 16), (50, 16), (18, 32)):
    register_model(f"resnet{_depth}_w{_width}", f"resnet{_depth}",
                   f"timm ResNet-{_depth} at base width {_width} for tiny images; small stem at <= 64 px",
                   functools.partial(_describe_narrow_resnet, width=_width), options=("zero_init_residual",))(
        functools.partial(_narrow_resnet, width=_width))

register_model("mobilenetv2_035", "mobilenetv2_035", "timm MobileNetV2 0.35; stride-1 stem at <= 64 px",
               _describe_mobilenetv2)(_mobilenetv2)


def _small_deit(timm_name, num_classes, in_chans, image_size, patch_size=None, embed_dim=64, depth=6, num_heads=2):
    patch = patch_size or deit_patch_size(image_size)
    if image_size % patch:
        raise ValueError(f"patch_size {patch} does not divide the image size {image_size}: pick a divisor")
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                             img_size=image_size, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=num_heads)


def _describe_small_deit(timm_name, image_size, patch_size=None):
    return (f"{timm_name} at embedding 64, 6 blocks, 2 heads (DeiT-Tiny: 192, 12, 3), img_size {image_size}, "
            f"patch {patch_size or deit_patch_size(image_size)}")


register_model("deit_w64", "deit_tiny_patch16_224",
               "timm DeiT at embedding 64, 6 blocks, 2 heads, for tiny images; patch = size/8 below 224 px",
               _describe_small_deit, options=("patch_size",))(_small_deit)


def list_models() -> list[str]:
    return sorted(MODELS)


def check_model_name(name: str) -> None:
    if name not in MODELS and not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(list_models())} or any timm model name "
                         "(`python -c 'import timm; print(timm.list_models())'` lists them)")


def _check_patch(name: str, patch_size: int | None) -> None:
    entry = MODELS.get(name)
    if patch_size is not None and (entry is None or "patch_size" not in entry.options):
        patched = [n for n, e in MODELS.items() if "patch_size" in e.options]
        raise ValueError(f"patch_size is set for {name!r}, which has no patches; only {', '.join(patched)} take it")


def _entry_options(entry: ModelEntry, patch_size: int | None, zero_init_residual: bool) -> dict:
    """The recipe's options that `entry` takes (`zero_init_residual`: our ResNets only; the
    other entries keep their own initialisation)."""
    given = {"patch_size": patch_size, "zero_init_residual": zero_init_residual}
    return {k: v for k, v in given.items() if k in entry.options}


def create_model(name: str, num_classes: int, in_chans: int, image_size: int,
                 patch_size: int | None = None, zero_init_residual: bool = False) -> nn.Module:
    """A fresh, randomly initialised model (seed torch before calling for a reproducible init): a
    registered entry, else timm's model of that name as it is."""
    check_model_name(name)
    _check_patch(name, patch_size)
    entry = MODELS.get(name)
    if entry is not None:
        options = _entry_options(entry, patch_size, zero_init_residual)
        return entry.build(entry.timm_name, num_classes, in_chans, image_size, **options)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def describe_adaptation(name: str, image_size: int, patch_size: int | None = None,
                        zero_init_residual: bool = False) -> str:
    """What the entry changes for this image size (recorded in every record)."""
    entry = MODELS.get(name)
    if entry is None:
        return f"timm {name}, unmodified"
    return entry.describe(entry.timm_name, image_size, **_entry_options(entry, patch_size, zero_init_residual))


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features before the classifier (timm's forward_head with pre_logits)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


# ---------------------------------------------------------------- ConvNet (issue 19: the field's small-scale student)
# The ConvNet most dataset-condensation methods (DC/DSA/DM, MTT, DATM, RDED's small tasks, DD-Ranking)
# are reported on, as their `networks.py` builds it (`ConvNet` with get_default_convnet_setting):
# `depth` blocks of 3x3 conv (width 128, padding 1; padding 3 in the first block of a one-channel
# input, their MNIST handling) -> instance norm (GroupNorm with one group per channel, affine) ->
# ReLU -> 2x2 average pooling, then one linear layer on the flattened map. Depth 3 up to 32 px
# (CIFAR), 4 at 64 px (Tiny-ImageNet, their ConvNetD4), one more per doubling (ConvNetD5 at 128 px,
# D6 at 256). PyTorch's default initialisation, as theirs.
CONVNET_WIDTH = 128


def convnet_depth(image_size: int) -> int:
    """3 up to 32 px, +1 per doubling above (64 px: 4)."""
    depth = 3
    while image_size > 32 * 2 ** (depth - 3):
        depth += 1
    return depth


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, image_size: int, depth: int, width: int = CONVNET_WIDTH):
        super().__init__()
        layers, channels = [], in_chans
        for d in range(depth):
            padding = 3 if in_chans == 1 and d == 0 else 1
            layers += [nn.Conv2d(channels, width, 3, padding=padding), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            channels = width
        self.features = nn.Sequential(*layers)
        with torch.no_grad():   # the flattened size, from the layers themselves (the padding changes it)
            self.num_features = self.features(torch.zeros(1, in_chans, image_size, image_size)).numel()
        if self.num_features == 0:
            raise ValueError(f"a depth-{depth} ConvNet pools a {image_size}px image to nothing: use a larger image")
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes)

    # The timm-style calls the rest of cdabench uses on every model.
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.classifier(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _describe_convnet(timm_name: str, image_size: int) -> str:
    return (f"ConvNet-D{convnet_depth(image_size)} (DC/MTT networks.py: width {CONVNET_WIDTH}, instance norm, ReLU, "
            "average pooling), PyTorch init")


@register_model("convnet", "convnet", "the dataset-condensation ConvNet: depth 3 (<= 32 px) / 4 (64 px), width 128, "
                "instance norm, ReLU, average pooling", _describe_convnet)
def _convnet(timm_name, num_classes, in_chans, image_size):
    return ConvNet(num_classes, in_chans, image_size, convnet_depth(image_size))
