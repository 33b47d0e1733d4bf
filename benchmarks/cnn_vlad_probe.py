"""Probe for issue 28: VLAD of an intermediate CNN feature map's positions, before it is an extractor.

    python benchmarks/cnn_vlad_probe.py LAYER SIZE K LDIM [LAYER SIZE K LDIM ...]
    python benchmarks/cnn_vlad_probe.py blocks.4 384 24 64

DELF/HOW's idea with imgdb's parts: each position of the map after stage ``LAYER`` of the default
backbone (the image's shorter side at ``SIZE``) is a local descriptor (its receptive field a patch,
as MOP's patches are, but one pass gives all of them); they are L2-normalised, PCA-whitened to
``LDIM`` (:func:`imgdb.features.whitening.learn_projection`, learned from the gallery, as an index
learns from its collection), normalised again and VLAD-pooled over ``K`` words
(:func:`imgdb.features.aggregate.learn_kmeans`, :func:`imgdb.features.aggregate.vlad`). Also the
default GeM descriptor, and the two concatenated (each of unit length).

Figures: mAP over full rankings of the museum's 60 query photos and of the held-out copy set of
:mod:`copies` (120 hard edited copies no choice was tuned on), and the rate of the PyTorch passes
(decoding included) of the map and of the GeM descriptor on this machine, in the same run: the
ratio is what an ONNX Runtime extractor would keep of GeM's rate.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import copies  # noqa: E402
from common import museum_or_exit  # noqa: E402

#: Positions per gallery image that the PCA and the words learn from.
SAMPLED = 200


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Passes:
    """The map after one stage, and the default GeM descriptor, of an image file (PyTorch)."""

    def __init__(self, layer: str, size: int) -> None:
        from imgdb.features.cnn import CnnExtractor
        from imgdb.features.cnn_config import DEFAULT_BACKBONE
        from imgdb.features.spec import parse_spec

        self.local = CnnExtractor.from_spec(parse_spec(f"cnn:{DEFAULT_BACKBONE}@{layer}/gem/size={size}"))
        self.whole = CnnExtractor.from_spec(parse_spec(f"cnn:{DEFAULT_BACKBONE}/gem"))

    def _input(self, extractor, path: Path):  # noqa: ANN001, ANN202
        import torch

        pixels = extractor.resized(np.asarray(Image.open(path).convert("RGB")))
        return torch.from_numpy(extractor.normalise(pixels))[None]

    def positions(self, path: Path) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.local.net.trunk(self._input(self.local, path))[0].flatten(1).T.numpy()

    def gem(self, path: Path) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.whole.net(self._input(self.whole, path))[0].numpy()


def probe(layer: str, size: int, k: int, ldim: int, sets: dict[str, Path]) -> None:
    from imgdb.features import aggregate
    from imgdb.features.whitening import learn_projection, project

    passes = Passes(layer, size)
    gallery = sorted((sets["museum"] / "images").glob("*.jpg"))
    started = time.perf_counter()
    local = [passes.positions(p) for p in gallery]
    local_rate = len(gallery) / (time.perf_counter() - started)
    started = time.perf_counter()
    gem = np.stack([passes.gem(p) for p in gallery])
    gem_rate = len(gallery) / (time.perf_counter() - started)
    rng = np.random.default_rng(0)
    sample = np.concatenate([unit(d)[rng.choice(len(d), min(len(d), SAMPLED), replace=False)] for d in local])
    state = learn_projection(sample, ldim, whiten=True)
    centres = aggregate.learn_kmeans(unit(project(sample, state, ldim)), k)

    def encode(descriptors: np.ndarray) -> np.ndarray:
        return aggregate.vlad(unit(project(unit(descriptors), state, ldim)), centres)

    encoded = np.stack([encode(d) for d in local])
    names = [f"images/{p.name}" for p in gallery]
    for variant in ("gem", "vlad", "gem+vlad"):
        figures = []
        for name, root in sets.items():
            queries = json.loads((root / "queries.json").read_text())
            precisions = []
            for query in queries:
                path = root / query["query"]
                parts = {"gem": lambda: (gem, passes.gem(path)),  # noqa: B023
                         "vlad": lambda: (encoded, encode(passes.positions(path))),  # noqa: B023
                         "gem+vlad": lambda: (np.concatenate([gem, encoded], 1),  # noqa: B023
                                              np.concatenate([passes.gem(path), encode(passes.positions(path))]))}
                stored, vector = parts[variant]()
                order = np.argsort(-(stored @ vector))
                relevant = set(query["relevant"])
                hits = [rank for rank, i in enumerate(order, 1) if names[i] in relevant]
                precisions.append(np.mean([n / rank for n, rank in enumerate(hits, 1)]) if hits else 0.0)
            figures.append(f"{name} mAP {np.mean(precisions):.3f}")
        dims = {"gem": gem.shape[1], "vlad": k * ldim, "gem+vlad": gem.shape[1] + k * ldim}[variant]
        print(f"| {layer} | {size} | {k} | {ldim} | {variant} | {dims} | " + " | ".join(figures)
              + f" | map {local_rate:.1f} img/s, GeM {gem_rate:.1f} img/s |", flush=True)


def main() -> None:
    configs = sys.argv[1:]
    if not configs or len(configs) % 4:
        sys.exit(__doc__.split("\n\n")[1])
    with tempfile.TemporaryDirectory(prefix="imgdb-probe-") as held:
        sets = {"museum": museum_or_exit(), "copies": copies.build(Path(held))}
        print("| layer | size | k | ldim | descriptor | dims | museum | copies (held out) | rates (PyTorch) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for i in range(0, len(configs), 4):
            layer, size, k, ldim = configs[i:i + 4]
            probe(layer, int(size), int(k), int(ldim), sets)


if __name__ == "__main__":
    main()
