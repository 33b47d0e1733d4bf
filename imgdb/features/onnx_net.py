"""The CNN extractor's default runtime: the network as an ONNX graph, run by ONNX Runtime.

On this project's 2-core reference machine ONNX Runtime runs the same network about twice as fast
as PyTorch eager, and a process that loads a graph instead of building the model answers its
first photo search in well under a second, where importing torch, torchvision and timm alone
takes several (benchmarks/inference.py).

The graph is derived state: exported once from the weights by :func:`imgdb.features.torch_net.export_graph`
and cached in the extractor context's graph cache (``IMGDB_HOME/cache/onnx``), named by a hash of everything that determines it (the
network's part of the spec, the identity of the backbone's weights, a fine-tuned network's
sha256, the exporter's versions). A missing or unreadable graph is exported again; a network that
cannot be exported is remembered as such and runs on PyTorch. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgdb.errors import ExtractorSpecError, ImgdbError
from imgdb.features.backbone_weights import installed_version, weights_identity
from imgdb.features.cnn_config import CnnConfig
from imgdb.features.pooling_numpy import NUMPY_POOLINGS

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

#: Bump when what :func:`~imgdb.features.torch_net.export_graph` writes changes: old graphs go stale.
GRAPH_FORMAT = 1


class GraphUnavailable(Exception):
    """This network does not export to ONNX (a layer the exporter cannot trace): use PyTorch."""


def graph_key(config: CnnConfig, maps: bool = False) -> str:
    """The sha256 a config's graph (``maps``: ending with the trunk's map) is cached under: equal
    keys, equal graphs."""
    versions = {name: installed_version(name) for name in ("torch", "timm", "onnx")}
    identity = {
        "format": GRAPH_FORMAT, "backbone": config.backbone, "layer": config.layer, "pooling": config.pooling,
        "params": [list(p) for p in config.params], "net": config.net, "versions": versions,
        "weights": weights_identity(config.backbone, config.weights),
        **({"maps": True} if maps else {}),  # (so that the keys of pooled graphs stay what they were)
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


#: The stored network's weights a graph is exported from (None: the backbone's ImageNet weights),
#: fetched only when the cache does not hold the graph.
Weights = Callable[[], "bytes | None"]


def cached_graph(config: CnnConfig, cache: Path | None, weights: Weights,
                 maps: bool = False) -> tuple[Path | bytes, dict]:
    """A config's graph (its file, or its bytes where there is no cache or it cannot be written)
    and its description, exported into ``cache`` first if missing."""
    key = graph_key(config, maps)
    if cache is None:
        return export_into(config, None, key, weights, maps)
    graph, described, failed = (cache / f"{key}{suffix}" for suffix in (".onnx", ".json", ".failed"))
    if failed.exists():
        raise GraphUnavailable(failed.read_text(errors="replace").strip())
    if graph.exists() and described.exists():
        try:
            return graph, json.loads(described.read_text())
        except (OSError, ValueError):
            pass  # (an unreadable description: export again)
    return export_into(config, cache, key, weights, maps)


def export_into(config: CnnConfig, cache: Path | None, key: str, weights: Weights,
                maps: bool = False) -> tuple[Path | bytes, dict]:
    """Export a config's graph into ``cache`` (atomically: a reader never sees half a file). A cache
    that cannot be written (a read-only ``IMGDB_HOME``) costs an export per process, not the search."""
    from imgdb.features.torch_net import export_graph  # torch: only when a graph is missing

    # (Said, not silent: a first command waits for this, up to a minute on a small machine.)
    log.info("preparing %s for ONNX Runtime, once%s", config.backbone,
             f" (kept in {cache})" if cache is not None else " per process")
    try:
        blob, meta = export_graph(config, weights(), maps)
    except ExtractorSpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: this network runs on PyTorch
        reason = f"{config.backbone} does not export to ONNX ({type(exc).__name__}: {(str(exc) or '-').splitlines()[0][:200]})"
        if cache is not None and not isinstance(exc, (OSError, MemoryError)):  # (those may pass: the next process tries again)
            with contextlib.suppress(OSError):
                cache.mkdir(parents=True, exist_ok=True, mode=0o700)
                _write(cache / f"{key}.failed", reason.encode())
        raise GraphUnavailable(reason) from None
    if cache is None:
        return blob, meta
    graph, described = cache / f"{key}.onnx", cache / f"{key}.json"
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(graph, blob)
        _write(described, json.dumps(meta).encode())
    except OSError as exc:
        log.warning("cannot cache the ONNX graph in %s (%s): exported for this process only", cache, exc)
        return blob, meta
    return graph, meta


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``IMGDB_DEVICE``: CUDA first where the installed
    onnxruntime (``onnxruntime-gpu``) offers it and the setting allows, the CPU always last."""
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise ImgdbError(f"IMGDB_DEVICE={device!r}: use auto, cpu or cuda")
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ImgdbError("IMGDB_DEVICE=cuda, but onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    cuda = device != "cpu" and "CUDAExecutionProvider" in available
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


class OnnxNetwork:
    """A config's network under ONNX Runtime: pooled vectors (or maps) of a batch, as :class:`TorchNetwork` gives.

    Two ways to spend the cores. One image (a query) runs on a session whose operators use every
    core: the lowest latency. Several batches of different shapes (an ingest batch: images keep
    their aspect, so they rarely share one) run side by side, one per core, each on a one-thread
    session: no operator waits at a barrier for a core that decoding took meanwhile. On the 2-core
    reference machine that ran about a fifth more images a second, with or without decoding beside
    it (the "own shapes" column of benchmarks/inference.py). The second session is made on first
    use, so a process that only searches never makes it.
    """

    runtime = "onnx"

    def __init__(self, config: CnnConfig, cache: Path | None, device: str = "auto",
                 weights: Weights = lambda: None, maps: bool = False) -> None:
        graph, meta = cached_graph(config, cache, weights, maps)
        try:
            self.session = self._session(graph, device)
        except ImgdbError:
            raise
        except Exception:  # noqa: BLE001 - a damaged file in the cache: export it again, once
            graph, meta = export_into(config, cache, graph_key(config, maps), weights, maps)
            self.session = self._session(graph, device)
        self._graph, self._device = graph, device
        self.dim = int(meta["dim"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self._pool = None if maps or meta["output"] == "pooled" else NUMPY_POOLINGS[config.pooling]
        self._params = dict(config.params)
        #: Batches run side by side: one per core, on the CPU only (a GPU runs one at a time).
        self._side_by_side = (os.cpu_count() or 1) if self.session.get_providers() == ["CPUExecutionProvider"] else 1
        self._side: tuple[onnxruntime.InferenceSession, ThreadPoolExecutor] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _session(graph: Path | bytes, device: str, threads: int | None = None) -> onnxruntime.InferenceSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3  # (warnings about unused initialisers are not the user's business)
        source = graph if isinstance(graph, bytes) else str(graph)
        return ort.InferenceSession(source, options, providers=providers(device))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Pooled vectors ``(N, dim)`` (or maps) of normalised pixels ``(N, 3, H, W)``."""
        return self._run(self.session, batch)

    def run_each(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`run` of each batch, several at once where there are cores for it."""
        if len(batches) < 2 or self._side_by_side < 2:
            return [self.run(batch) for batch in batches]
        session, workers = self._one_thread_session()
        return list(workers.map(lambda batch: self._run(session, batch), batches))

    def _run(self, session: onnxruntime.InferenceSession, batch: np.ndarray) -> np.ndarray:
        out = session.run(None, {"pixels": batch})[0]
        return out if self._pool is None else self._pool(out, **self._params)

    def _one_thread_session(self) -> tuple[onnxruntime.InferenceSession, ThreadPoolExecutor]:
        with self._lock:
            if self._side is None:
                self._side = (self._session(self._graph, self._device, threads=1),
                              ThreadPoolExecutor(self._side_by_side, thread_name_prefix="imgdb-onnx"))
            return self._side
