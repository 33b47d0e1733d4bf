"""What a global descriptor alone can say of *the same picture*: crops and turns against bursts.

    python benchmarks/duplicates_global.py [--k 20] [--out benchmarks/results]

On the data set of :mod:`duplicates` (the same seed), each image's CNN feature map (the default
descriptor's network and size) gives three similarities of a pair, each a cosine of GeM vectors:

- ``plain``: the two images' descriptors (what the index stores);
- ``turned``: the best over the quarter turns of one image (a picture turned by 90° is found);
- ``regions``: the best, over the quarter turns of one image, of its descriptor against every window
  of the other's feature map of about its shape (at least 30% of each side), both ways: a crop is a
  window of its source, so a global stage that knew where to look would score it as its source.

Per kind of pair (a source and its edit, two edits, two shots of a burst, the other nearest
neighbours) the 10th percentile and median of each, and, for a cut of each chosen on the first half
(best F1), the second half's pairwise precision, recall and F1 of *near* and the share of burst
pairs taken for near. The question it answers: can any cut of a global similarity take crops and
turns without taking two shots of one scene?
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import museum_or_exit  # noqa: E402
from duplicates import EDITS, build, pair, scores  # noqa: E402

RESULTS = HERE / "results"
#: GeM's exponent (the default descriptor's).
P = 3.0
#: Smallest window side, as a share of the map's side; largest ratio of a window's aspect to the image's.
SMALLEST, ASPECT = 0.3, 1.3
HARD = ("crop", "rotate", "inset")


def describe(paths: list[Path]) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Per image: its four quarter turns' unit GeM vectors, and its unturned map's windows (unit GeM
    vectors, and each window's width/height ratio)."""
    import torch

    from imgdb.features.cnn import CnnExtractor
    from imgdb.features.cnn_config import DEFAULT_BACKBONE
    from imgdb.features.spec import parse_spec

    extractor = CnnExtractor.from_spec(parse_spec(f"cnn:{DEFAULT_BACKBONE}/gem"))
    net = extractor.net.eval()
    turns, windows = [], []
    with torch.no_grad():
        for path in paths:
            pixels = extractor.resized(np.asarray(Image.open(path).convert("RGB")))
            mine = []
            for turn in range(4):
                array = extractor.normalise(np.ascontiguousarray(np.rot90(pixels, turn)))
                powered = net.trunk(torch.from_numpy(array)[None])[0].clamp(min=1e-6).pow(P).numpy()
                mine.append(unit(powered.mean((1, 2)) ** (1 / P)))
                if turn == 0:
                    windows.append(pooled_windows(powered.astype(np.float64)))
            turns.append(np.stack(mine))
    return turns, windows


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pooled_windows(powered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GeM of every window of a map (of activations raised to P) at least SMALLEST of each side, by a
    summed-area table, and the windows' width/height ratios."""
    _, h, w = powered.shape
    table = np.zeros((powered.shape[0], h + 1, w + 1))
    table[:, 1:, 1:] = powered.cumsum(1).cumsum(2)
    rows = [(y0, y1) for y0 in range(h) for y1 in range(y0 + max(1, round(SMALLEST * h)), h + 1)]
    cols = [(x0, x1) for x0 in range(w) for x1 in range(x0 + max(1, round(SMALLEST * w)), w + 1)]
    vectors, ratios = [], []
    for y0, y1 in rows:
        for x0, x1 in cols:
            total = table[:, y1, x1] - table[:, y0, x1] - table[:, y1, x0] + table[:, y0, x0]
            vectors.append(np.maximum(total / ((y1 - y0) * (x1 - x0)), 1e-18) ** (1 / P))
            ratios.append((x1 - x0) / (y1 - y0))
    return unit(np.stack(vectors)).astype(np.float32), np.array(ratios)


def inside(turns: np.ndarray, shape: float, windows: tuple[np.ndarray, np.ndarray]) -> float:
    """The best cosine of an image's turns against the windows of another of about its (turned) shape."""
    vectors, ratios = windows
    best = -1.0
    for turn, vector in enumerate(turns):
        aspect = shape if turn % 2 == 0 else 1 / shape
        fits = np.maximum(ratios / aspect, aspect / ratios) < ASPECT
        if fits.any():
            best = max(best, float((vectors[fits] @ vector).max()))
    return best


def kind_of(key: tuple[str, str], labels: dict[tuple[str, str], str]) -> str:
    label = labels.get(key)
    if label is None:
        return "other neighbours"
    if label == "near":
        edits = sorted({name.split("__")[1].split(".")[0] for name in key} & set(HARD))
        return "two edits: " + ("+".join(edits) if edits else "others")
    return {"similar": "burst shots"}.get(label, label.replace("near:", "source and "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    gallery = sorted((museum_or_exit() / "images").glob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="imgdb-dups-global-") as root:
        files, labels, (tuning, held) = build(gallery, 100, 30, Path(root))
        turns, windows = describe(files)
        shapes = [width / height for width, height in (Image.open(path).size for path in files)]
    names = [path.name for path in files]
    plain = np.stack([t[0] for t in turns])
    cosines = plain @ plain.T
    np.fill_diagonal(cosines, -1)
    keys = set(labels) | {pair(names[i], names[j]) for i in range(len(names)) for j in np.argsort(-cosines[i])[: args.k]}
    where = {name: i for i, name in enumerate(names)}
    found: dict[tuple[str, str], tuple[float, float, float]] = {}
    for key in keys:
        a, b = where[key[0]], where[key[1]]
        found[key] = (float(cosines[a, b]), float((turns[a] @ plain[b]).max()),
                      max(inside(turns[a], shapes[a], windows[b]), inside(turns[b], shapes[b], windows[a])))
    columns = ("plain", "turned", "regions")
    by_kind: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for key, values in found.items():
        by_kind[kind_of(key, labels)].append(values)
    lines = ["Similarity (cosine) by kind of pair: 10th percentile / median.", "",
             "| pairs | n | " + " | ".join(columns) + " |", "|---" * (2 + len(columns)) + "|"]
    for kind in sorted(by_kind):
        values = np.array(by_kind[kind])
        lines.append(f"| {kind} | {len(values)} | " + " | ".join(
            f"{np.quantile(values[:, c], 0.1):.3f} / {np.median(values[:, c]):.3f}" for c in range(len(columns))) + " |")
    half_one, half_two = set(tuning), set(held)
    lines += ["", "Near pairs by a cut of each similarity chosen on the first half (best F1); the second half's figures:",
              "", "| similarity | cut | precision | recall | f1 | " + " | ".join(EDITS) + " | similar as near |",
              "|---" * (6 + len(EDITS)) + "|"]
    for c, name in enumerate(columns):
        cuts = np.quantile([v[c] for v in found.values()], np.linspace(0.5, 1, 201))
        cut = max(cuts, key=lambda t: scores({p for p, v in found.items() if v[c] >= t}, labels, half_one)["f1"])  # noqa: B023
        row = scores({p for p, v in found.items() if v[c] >= cut}, labels, half_two)
        lines.append(f"| {name} | ≥ {cut:.3f} | " + " | ".join(
            f"{row[k]:.3f}" for k in ("precision", "recall", "f1", *EDITS, "similar as near")) + " |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "duplicates_global.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
