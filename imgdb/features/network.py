"""The retrieval network: one ``torch.nn.Module`` from normalised pixels to a unit-length descriptor.

trunk (the backbone's convolutional stages) → pooling (GeM's ``p`` a learnable parameter) → L2 →
whitening (a linear layer) → L2, as in Radenović et al.'s ``ImageRetrievalNet``. The CNN extractor
encodes with it and :mod:`imgdb.training` fine-tunes it, so the network trained is exactly the one
that extracts.

The trunk is a list of named *stages* (stem, ``blocks.0``…, head) rather than the backbone's own
``forward_features``, so that training can freeze a prefix of them, cache that prefix's output, and
train the rest. Off-the-shelf, the stages are the shared, cached backbone's own modules (no copy);
:meth:`RetrievalNet.detach_from` gives the network private copies of the stages it will train.

A trained network is stored as the part that differs from its backbone's ImageNet weights (the
trained stages, the pooling's parameters, the whitening) in safetensors bytes, content-addressed by
their sha256 (:func:`serialize`): a spec names weights by hash, never by path, so an
index encodes a query tomorrow exactly as it encoded its collection, on any machine.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from imgdb.errors import ExtractorSpecError
from imgdb.features.pooling import POOLINGS, gem

# ------------------------------------------------------------------ stages


class _Intermediate(nn.Module):
    """A backbone without named stages, cut at one of its ``feature_info`` stages by timm itself."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True, stop_early=True)[0]


class _Features(nn.Module):
    """A backbone without named stages, whole (its ``forward_features``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def trunk_stages(model: nn.Module, layer: str | None = None) -> list[tuple[str, nn.Module]]:
    """The backbone's convolutional trunk as ``(name, module)`` stages, in order, up to ``layer``.

    Running them in sequence is ``forward_features`` (or, with ``layer``, the map of that stage).
    timm's EfficientNet/-Lite family and ResNets are spelled out stage by stage, so that training can
    freeze a prefix; any other backbone is one opaque stage, which extracts but cannot be fine-tuned.
    """
    stages: list[tuple[str, nn.Module]]
    if all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):  # timm EfficientNet
        stages = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
        stages += [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
        stages.append(("head", nn.Sequential(model.conv_head, model.bn2)))
    elif all(hasattr(model, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer4")):  # timm ResNet
        stages = [("stem", nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool))]
        stages += [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]
    else:
        if layer is None:
            return [("trunk", _Features(model))]
        return [(layer, _Intermediate(model, _stage_index(model, layer)))]
    if layer is None:
        return stages
    names = [name for name, _ in stages]
    if layer not in names:
        _stage_index(model, layer)  # the error that lists the stages feature_info knows
        raise ExtractorSpecError(f"stage {layer!r} is not a stage of the trunk; its stages: {', '.join(names)}")
    return stages[: names.index(layer) + 1]


def _stage_index(model: nn.Module, layer: str) -> int:
    stages = [info["module"] for info in getattr(model, "feature_info", [])]
    if layer not in stages:
        known = ", ".join(stages) or "none (not a timm model)"
        raise ExtractorSpecError(f"the backbone has no stage {layer!r}; its stages: {known}")
    return stages.index(layer)


# ------------------------------------------------------------------ pooling


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent (fine-tuning learns ``p`` too)."""

    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p)


class FixedPooling(nn.Module):
    """Any other pooling of :mod:`imgdb.features.pooling`, with its spec options bound."""

    def __init__(self, fn: Callable[..., torch.Tensor], params: Mapping[str, float]) -> None:
        super().__init__()
        self.fn, self.params = fn, dict(params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **self.params)


def make_pooling(name: str, params: Mapping[str, float], model: nn.Module) -> nn.Module:
    """The pooling a spec names, on ``model``'s map (class-weighted poolings also use its classifier)."""
    if name == "gem":
        return GeM(params.get("p", 3.0))
    if POOLINGS[name].classifier:
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(classifier, nn.Linear):
            raise ExtractorSpecError(f"{name} pooling needs a timm backbone with its ImageNet classifier")
        params = {**params, "weight": classifier.weight.detach(), "bias": classifier.bias.detach()}
    return FixedPooling(POOLINGS[name].fn, params)


# ------------------------------------------------------------------ the network


class RetrievalNet(nn.Module):
    """trunk stages → pooling → L2 → whitening → L2.

    ``whiten`` is None until a whitening is learned (:meth:`set_whitening`, or fine-tuning, which
    starts from the identity); without it the descriptor is the L2-normalised pooled vector.
    """

    def __init__(self, stages: list[tuple[str, nn.Module]], pooling: nn.Module, dim: int) -> None:
        super().__init__()
        self.stage_names = [name for name, _ in stages]
        self.stages = nn.ModuleList(module for _, module in stages)
        self.pool = pooling
        self.dim = dim
        self.whiten: nn.Linear | None = None
        #: Index of the first stage this network trains (and owns a copy of); len(stages): none.
        self.trained_from = len(stages)

    # ---------------------------------------------------------- forward

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The map after the stages that are not trained (what training may cache)."""
        for stage in self.stages[: self.trained_from]:
            x = stage(x)
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled vector, from the output of :meth:`frozen`."""
        for stage in self.stages[self.trained_from:]:
            x = stage(x)
        return self.pool(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.frozen(x))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The map after every stage (what the pooling pools)."""
        for stage in self.stages:
            x = stage(x)
        return x

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """L2 → whitening → L2 of pooled (or summed multi-scale) vectors."""
        x = F.normalize(pooled, dim=-1)
        if self.whiten is None:
            return x
        return F.normalize(self.whiten(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x))

    # ---------------------------------------------------------- whitening

    def set_whitening(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor) -> None:
        """A learned PCA-whitening as the linear layer: ``W = diag(scale)·components``, ``b = -W·mean``;
        rows past the learned components stay zero, so the output keeps ``dim`` dimensions."""
        weight = torch.zeros(self.dim, components.shape[1])
        weight[: len(components)] = scale[:, None] * components
        self.whiten = nn.Linear(components.shape[1], self.dim)
        with torch.no_grad():
            self.whiten.weight.copy_(weight)
            self.whiten.bias.copy_(-(weight @ mean))

    def identity_whitening(self) -> None:
        """Start a whitening to be trained at the identity (the off-the-shelf descriptor)."""
        self.whiten = nn.Linear(self.dim, self.dim)
        with torch.no_grad():
            self.whiten.weight.copy_(torch.eye(self.dim))
            self.whiten.bias.zero_()

    # ---------------------------------------------------------- training

    def detach_from(self, first_trained: int) -> None:
        """Own private copies of stages ``first_trained:`` and of the pooling (the backbone's
        modules are shared by every extractor of the process and must never change)."""
        if not 0 <= first_trained <= len(self.stages):
            raise ExtractorSpecError(f"cannot train from stage {first_trained} of {len(self.stages)}")
        if first_trained > 0 and isinstance(self.stages[0], (_Features, _Intermediate)):
            raise ExtractorSpecError("this backbone cannot be fine-tuned: imgdb splits the stages of timm "
                                     "EfficientNets and ResNets only")
        for i in range(first_trained, len(self.stages)):
            self.stages[i] = copy.deepcopy(self.stages[i])
        self.pool = copy.deepcopy(self.pool)
        self.trained_from = first_trained

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What differs from the backbone: the trained stages (by stage name), pooling, whitening."""
        return {k: v.detach().cpu().contiguous() for k, v in self.named_state().items()}

    def load_trained(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`trained_state` stored, strictly: every trained stage's every tensor."""
        stages = {name for name in self.stage_names for key in state if key.startswith(f"stages.{name}.")}
        if not stages or any(key.startswith("stages.") and not any(key.startswith(f"stages.{n}.") for n in stages)
                             for key in state):
            raise ExtractorSpecError("network weights do not fit this backbone: their stages are not its stages")
        first = min(self.stage_names.index(s) for s in stages)
        self.detach_from(first)
        if "whiten.weight" in state:
            self.identity_whitening()
        expected = self.trained_state()
        if set(expected) != set(state) or any(expected[k].shape != state[k].shape for k in state):
            missing = sorted(set(expected) - set(state))[:1] or sorted(set(state) - set(expected))[:1]
            raise ExtractorSpecError(f"network weights do not fit this backbone (e.g. {missing or 'shapes'})")
        with torch.no_grad():
            for key, value in self.named_state().items():
                value.copy_(state[key])

    def named_state(self) -> dict[str, torch.Tensor]:
        """The live tensors of the trained stages, the pooling and the whitening, by stored name."""
        live: dict[str, torch.Tensor] = {}
        for i in range(self.trained_from, len(self.stages)):
            for key, value in self.stages[i].state_dict(keep_vars=True).items():
                live[f"stages.{self.stage_names[i]}.{key}"] = value
        live.update({f"pool.{k}": v for k, v in self.pool.state_dict(keep_vars=True).items()})
        if self.whiten is not None:
            live.update({f"whiten.{k}": v for k, v in self.whiten.state_dict(keep_vars=True).items()})
        return live


# ------------------------------------------------------------------ stored weights


def whole_trunk(state: Mapping[str, torch.Tensor], layer: str | None) -> bool:
    """Whether stored weights replace every stage (then the backbone needs no pretrained weights):
    they hold the first stage, whatever the backbone calls it."""
    firsts = ("stages.stem.", "stages.trunk.", *((f"stages.{layer}.",) if layer else ()))
    return any(key.startswith(firsts) for key in state)


def serialize(state: Mapping[str, torch.Tensor]) -> tuple[str, bytes]:
    """``(sha256, safetensors bytes)`` of a trained state: the same tensors give the same bytes."""
    blob = safetensors_save(dict(sorted(state.items())))
    return hashlib.sha256(blob).hexdigest(), blob


def deserialize(blob: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (a format that cannot carry code, unlike a pickle)."""
    try:
        return safetensors_load(blob)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign bytes
        raise ExtractorSpecError(f"network weights are not readable safetensors: {exc}") from None
