"""Where a CNN's forward pass runs: ONNX Runtime (:mod:`imgdb.features.onnx_net`, the default) or
PyTorch (:mod:`imgdb.features.torch_net`). Both give the pooled vectors of a batch of normalised
pixels, or, loaded with ``maps``, the feature maps the trunk ends with (what an extractor that
aggregates the map's positions itself needs); :func:`load_network` picks one for an extractor's
context, falling back to PyTorch for a network that does not export."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from imgdb.errors import ExtractorSpecError
from imgdb.features.base import ExtractorContext
from imgdb.features.cnn_config import DEFAULT_SIZE, CnnConfig

log = logging.getLogger(__name__)

RUNTIMES = ("onnx", "torch")


class Network(Protocol):
    """A runtime's network: what a batch of normalised pixels ``(N, 3, H, W)`` gives, pooled vectors
    ``(N, dim)`` or, for a network loaded with ``maps``, maps ``(N, dim, h, w)``; and what its input
    needs."""

    runtime: str
    dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def run_each(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``run`` of each batch (batches of different shapes, which cannot share a pass)."""
        ...


def network_weights(config: CnnConfig, context: ExtractorContext) -> bytes | None:
    """The stored network a config names (``net=``), from the context; None for ImageNet weights."""
    return context.network(config.net) if config.net else None


def load_network(config: CnnConfig, context: ExtractorContext, *, maps: bool = False) -> Network:
    """The network of a config under the context's runtime (``maps``: ending with the trunk's map,
    unpooled)."""
    if context.runtime not in RUNTIMES:
        raise ExtractorSpecError(f"IMGDB_RUNTIME={context.runtime[:20]!r}: use onnx or torch")
    if context.runtime == "onnx":
        from imgdb.features.onnx_net import GraphUnavailable

        try:
            # Size, scales and whitening happen outside the graph: extractors that differ only
            # there (an index's trainable instance and the shared one) share one session.
            return _onnx_network(replace(config, size=DEFAULT_SIZE, scales=(1.0,), whiten="off"),
                                 context.graph_cache, context.device, lambda: network_weights(config, context), maps)
        except GraphUnavailable as exc:
            log.warning("%s: runs on PyTorch", exc)
    from imgdb.features.torch_net import TorchNetwork

    # (One per extractor: its whitening is its own.)
    return TorchNetwork(config, context.device, network_weights(config, context), maps)


def _onnx_network(config: CnnConfig, cache: Path | None, device: str, weights: Callable[[], bytes | None],
                  maps: bool) -> Network:
    """One ONNX Runtime session per network, shared by every extractor of this process that runs
    it (an index's trainable instance and the shared one, several catalogs): the key is what
    determines the graph; the weights are fetched only to export it."""
    key = (config, cache, device, maps)
    with _sessions_lock:
        if key not in _sessions:
            from imgdb.features.onnx_net import OnnxNetwork

            _sessions[key] = OnnxNetwork(config, cache, device, weights, maps)
        return _sessions[key]


_sessions: dict[tuple[CnnConfig, Path | None, str, bool], Network] = {}
_sessions_lock = threading.Lock()
