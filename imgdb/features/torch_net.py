"""The CNN extractor's PyTorch side: the :class:`~imgdb.features.network.RetrievalNet` a config
describes, run on a batch, and exported to the ONNX graph the default runtime runs.

Everything here imports torch and timm, which take seconds to load; :mod:`imgdb.features.runtimes`
reaches it for the ``torch`` runtime, training uses it, and :mod:`imgdb.features.onnx_net` exports a
graph the cache does not hold yet with it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imgdb.errors import ExtractorSpecError, ImgdbError
from imgdb.features.backbones import backbone_normalization, create_backbone
from imgdb.features.cnn_config import CnnConfig
from imgdb.features.network import RetrievalNet, deserialize, make_pooling, serialize, trunk_stages, whole_trunk
from imgdb.features.pooling_kinds import KINDS

#: ONNX operator set of exported graphs (part of a graph's cache key).
OPSET = 17


def torch_device(setting: str) -> torch.device:
    """``IMGDB_DEVICE``: ``auto`` takes CUDA when torch sees a GPU; ``cuda`` insists on one."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ImgdbError(f"IMGDB_DEVICE={setting!r}: use auto, cpu or cuda")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ImgdbError("IMGDB_DEVICE=cuda, but torch sees no CUDA device")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


class TorchNetwork:
    """The network of a config under PyTorch: what training fine-tunes and ``IMGDB_RUNTIME=torch`` runs."""

    runtime = "torch"

    def __init__(self, config: CnnConfig, device: str = "cpu", weights: bytes | None = None, maps: bool = False) -> None:
        """``weights``: the stored network ``config.net`` names (its safetensors bytes); ``maps``: give
        the trunk's maps, unpooled."""
        if config.net and weights is None:
            raise ExtractorSpecError(f"network {config.net[:12]}: its weights were not given")
        stored = deserialize(weights) if weights is not None else None
        self.model = create_backbone(config.backbone, Path(config.weights) if config.weights else None,
                                     pretrained=stored is None or not whole_trunk(stored, config.layer))
        self.mean, self.std = backbone_normalization(config.backbone, self.model)
        self.net = build_net(config, self.model)
        if stored is not None:
            self.net.load_trained(stored)
        self.net.eval()
        self.dim = self.net.dim
        self.maps = maps
        self.device = torch_device(device)
        if self.device.type != "cpu":
            self.net.detach_from(0)  # (a private copy on the GPU: the shared backbone stays on the CPU)
            self.net.to(self.device)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Pooled vectors ``(N, dim)`` (or maps) of normalised pixels ``(N, 3, H, W)``."""
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            return (self.net.trunk(x) if self.maps else self.net.pooled(x)).float().cpu().numpy()

    def run_each(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`run` of each batch, in turn (torch's operators use every core already)."""
        return [self.run(batch) for batch in batches]


def build_net(config: CnnConfig, model: torch.nn.Module) -> RetrievalNet:
    """The off-the-shelf network of a spec, on the process's shared backbone ``model``."""
    stages = trunk_stages(model, config.layer)
    pooling = make_pooling(config.pooling, dict(config.params), model)
    with torch.inference_mode():  # the dimension, from a tiny image's map
        x = torch.zeros(1, 3, 64, 64)
        for _, stage in stages:
            x = stage(x)
        dim = int(pooling(x).shape[1])
    return RetrievalNet(stages, pooling, dim)


def network_from_file(config: CnnConfig) -> tuple[str, bytes]:
    """A spec's ``weights=PATH`` as a network to store by hash: the hash and the bytes (the spec then
    names ``net=<sha256>`` instead of the path, which can change or be missing on another machine)."""
    if config.weights is None:
        raise ExtractorSpecError("no weights= file in the spec")
    if KINDS[config.pooling].classifier:  # (the stored stages would not carry the file's classifier)
        raise ExtractorSpecError(f"{config.pooling} pooling uses the backbone's ImageNet classifier, not a weights file")
    net = build_net(config, create_backbone(config.backbone, Path(config.weights)))
    net.detach_from(0)
    return serialize(net.trained_state())


class _Graph(torch.nn.Module):
    """What is exported: the trunk, and the pooling unless it is laid out from the map's size."""

    def __init__(self, net: RetrievalNet, pool: bool) -> None:
        super().__init__()
        self.net, self.pool = net, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.trunk(x)
        return self.net.pool(x) if self.pool else x


def export_graph(config: CnnConfig, weights: bytes | None = None, maps: bool = False) -> tuple[bytes, dict[str, object]]:
    """The ONNX graph of a config's network (batch, height and width dynamic; ``weights``: the
    stored network it names) and what running it needs to know: the input normalisation, the
    dimension, and whether it returns pooled vectors or the map (``output``). The whitening is not
    in it: it applies after multi-scale sums. ``maps``: the graph ends with the trunk's map."""
    network = TorchNetwork(config, "cpu", weights)
    pool = not maps and not KINDS[config.pooling].shape_dependent
    graph = _Graph(network.net, pool).eval()
    example = torch.zeros(1, 3, config.size, round(config.size * 4 / 3))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["pixels"],
                          output_names=["out"], dynamic_axes={"pixels": {0: "n", 2: "h", 3: "w"}, "out": {0: "n"}})
    meta = {"dim": network.dim, "mean": list(network.mean), "std": list(network.std),
            "output": "pooled" if pool else "map"}
    return buffer.getvalue(), meta
