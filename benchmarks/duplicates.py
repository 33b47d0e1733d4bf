"""Near duplicates: how well imgdb tells *the same picture* from a different one, against the hash tools.

    python benchmarks/duplicates.py [--sources 100] [--bursts 30] [--k 10] [--out benchmarks/results]

The data set is built in a temporary folder from the museum gallery (seeded): ``--sources`` paintings
each get one edited copy per kind in :data:`EDITS` (re-encoded, resized, cropped, rotated, colours
changed, captioned, pasted into a larger frame); ``--bursts`` other paintings are replaced by two
"burst" shots of the scene (:data:`BURSTS`: each shows a part the other does not, as a camera that
moved between shots), which are *similar*, not the same picture; the other paintings stay as
distractors, unedited. Ground truth: every pair within one source's picture and its edits is
``near``; the two shots of a burst are ``similar`` and must never be taken for ``near``.

Methods, each predicting which pairs are ``near``:

- imagededup's PHash at its default ``max_distance_threshold`` (10 of 64 bits), and imagehash's pHash
  at the same Hamming distance (imagehash documents no threshold of its own);
- imgdb, the default CNN descriptor (two indexes of the data set: ``plain``, and ``verified``, which
  keeps local features), each calibrated (``Imgdb.calibrate``) on the images of the first half of the
  sources and the distractors only, so that the figures, the second half's, are of images it did not
  learn from:
  - a raw distance cut, chosen to maximise F1 on the first half (what a user of a distance has);
  - search hits with ``--min-score 0.5`` among each image's ``--k`` nearest (with ``--rerank verify``
    on the second index);
  - ``imgdb duplicates``: pairs within one ``near`` group.

Figures: pairwise precision, recall and F1 over the held-apart half, recall per edit kind (pairs of a
source and its edit), the share of burst pairs taken for ``near``; the reliability of the calibrated
score on the held-apart half's nearest-neighbour pairs (a table, and ``calibration.png``); the time
the calibration and the duplicates job took. Writes ``duplicates.md`` and ``calibration.png``.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import museum_or_exit, private_imgdb  # noqa: E402

RESULTS = HERE / "results"
#: Hamming distance (bits of 64) under which a hash tool calls two images duplicates: imagededup's default.
HASH_THRESHOLD = 10
Pair = tuple[str, str]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _caption(image: Image.Image) -> Image.Image:
    out = image.copy()
    band = max(12, image.height // 8)
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, image.height - band, image.width, image.height), fill=(255, 255, 255))
    draw.text((band // 3, image.height - band * 3 // 4), "(c) imgdb museum 2026 - do not copy", fill=(0, 0, 0))
    return out


def _inset(image: Image.Image) -> Image.Image:
    frame = Image.new("RGB", (int(image.width * 1.7), int(image.height * 1.7)), (96, 104, 112))
    small = image.resize((int(image.width * 0.6), int(image.height * 0.6)), Image.Resampling.LANCZOS)
    frame.paste(small, (frame.width // 5, frame.height // 4))
    return frame


def _crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    return image.crop((int(image.width * left), int(image.height * top), int(image.width * right),
                       int(image.height * bottom)))


#: The edits that keep the picture: each a function of the source image.
EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "reencode": lambda image: _jpeg(image, 40),
    "resize": lambda image: image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR),
    "crop": lambda image: _crop(image, 0.15, 0.15, 0.85, 0.85),
    "rotate": lambda image: image.rotate(90, expand=True),
    "colour": lambda image: ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.3)).enhance(0.6),
    "caption": _caption,
    "inset": _inset,
}
#: Two shots of one scene: each shows a quarter of the width the other does not, the second a little
#: brighter and lower, as a camera that moved between shots. Overlapping, not the same picture.
BURSTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "burst_left": lambda image: _crop(image, 0.0, 0.0, 0.75, 0.92),
    "burst_right": lambda image: ImageEnhance.Brightness(_crop(image, 0.25, 0.08, 1.0, 1.0)).enhance(1.1),
}


def build(gallery: list[Path], sources: int, bursts: int,
          root: Path) -> tuple[list[Path], dict[Pair, str], list[list[str]]]:
    """The data set's files, the labelled pairs (``near:KIND`` for a source and its edit, ``near`` for
    two edits, ``similar`` for the shots of a burst) and the sources' names (bursts included) split in
    two halves."""
    picked = random.Random(0).sample(gallery, sources + bursts)
    chosen, scenes = picked[:sources], picked[sources:]
    files, labels = [], {}
    for path in gallery:
        image = Image.open(path).convert("RGB")
        if path in scenes:
            shots = []
            for kind, shot in BURSTS.items():
                copy = root / f"{path.stem}__{kind}.jpg"
                shot(image).save(copy, "JPEG", quality=92)
                files.append(copy)
                shots.append(copy.name)
            labels[pair(*shots)] = "similar"
            continue
        target = root / f"{path.stem}.jpg"
        image.save(target, "JPEG", quality=95)
        files.append(target)
        if path not in chosen:
            continue
        edited = []
        for kind, edit in EDITS.items():
            copy = root / f"{path.stem}__{kind}.png"
            edit(image).save(copy)
            files.append(copy)
            labels[pair(target.name, copy.name)] = f"near:{kind}"
            edited.append(copy.name)
        for i, first in enumerate(edited):
            for second in edited[i + 1:]:
                labels[pair(first, second)] = "near"
    halves = [[p.stem for p in group[: len(group) // 2]] for group in (chosen, scenes)]
    halves += [[p.stem for p in group[len(group) // 2:]] for group in (chosen, scenes)]
    return files, labels, [halves[0] + halves[1], halves[2] + halves[3]]


def pair(a: str, b: str) -> Pair:
    return (a, b) if a < b else (b, a)


def source_of(name: str) -> str:
    return name.split("__")[0].removesuffix(".jpg").removesuffix(".png")


def in_half(labels: dict[Pair, str], half: set[str]) -> Callable[[Pair], bool]:
    """Whether both images of a pair belong to ``half``'s sources or to the distractors."""
    others = {source_of(a) for a, _ in labels} - half
    return lambda p: all(source_of(name) in half or "__" not in name and source_of(name) not in others for name in p)


def scores(predicted: set[Pair], labels: dict[Pair, str], half: set[str]) -> dict[str, float]:
    """Pairwise precision, recall, F1 over pairs whose images both belong to ``half``'s sources or to
    the distractors (a pair with an image of the other half is left out), recall per edit kind, and
    burst pairs taken for near."""
    kept = in_half(labels, half)
    predicted = {p for p in predicted if kept(p)}
    truth = {p for p, label in labels.items() if label.startswith("near") and kept(p)}
    hits = predicted & truth
    precision = len(hits) / len(predicted) if predicted else 1.0
    recall = len(hits) / len(truth) if truth else 1.0
    figures = {"precision": precision, "recall": recall,
               "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}
    for kind in EDITS:
        wanted = {p for p, label in labels.items() if label == f"near:{kind}" and kept(p)}
        figures[kind] = len(wanted & predicted) / len(wanted)
    bursts = {p for p, label in labels.items() if label == "similar" and kept(p)}
    figures["similar as near"] = len(bursts & predicted) / len(bursts)
    return figures


def hash_pairs(files: list[Path], method: str) -> set[Pair]:
    """Pairs within HASH_THRESHOLD bits by imagededup's PHash or imagehash's pHash."""
    if method == "imagededup":
        from imagededup.methods import PHash

        hasher = PHash(verbose=False)
        encodings = {p.name: hasher.encode_image(image_file=str(p)) for p in files}
        # (It narrates each step at INFO, and warns that a parameter it passes itself has no effect.)
        logging.disable(logging.INFO)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            found = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=HASH_THRESHOLD)
        logging.disable(logging.NOTSET)
        return {pair(a, b) for a, others in found.items() for b in others}
    import imagehash

    hashes = [(p.name, imagehash.phash(Image.open(p))) for p in files]
    return {pair(a, b) for i, (a, ha) in enumerate(hashes) for b, hb in hashes[i + 1:] if ha - hb <= HASH_THRESHOLD}


#: Per pair: distance, whether it verified, inliers, calibrated score.
Found = dict[Pair, tuple[float, bool, int, float]]
BINS = np.linspace(0, 1, 11)


def neighbours(db, index: str, k: int, rerank: str) -> Found:  # noqa: ANN001
    """Every image's k nearest (itself left out), with the pair's evidence (of the direction with more
    inliers, then the smaller distance, where both images found the other)."""
    with db.database.connect() as conn:
        ids = dict(conn.exec_driver_sql(f"SELECT id, uri FROM images_{index}").all())
    found: Found = {}
    for image_id, uri in ids.items():
        for hit in db.search(f"id:{image_id}", k=k + 1, index=index, rerank=rerank, candidates=k + 1):
            if hit.id != image_id:
                key = pair(Path(uri).name, Path(hit.uri).name)
                mine = (hit.distance, bool(hit.notes.get("verified")), int(hit.notes.get("inliers", 0)),
                        float(hit.notes.get("score", 0.0)))
                found[key] = max(mine, found.get(key, mine), key=lambda evidence: (evidence[2], -evidence[0]))
    return found


def grouped_pairs(groups: list[dict], uris: dict[int, str], level: str) -> set[Pair]:
    """Every pair of images within one group of ``level`` (what grouping predicts)."""
    found = set()
    for group in groups:
        if group["level"] == level:
            names = [Path(uris[image["id"]]).name for image in group["images"]]
            found |= {pair(a, b) for i, a in enumerate(names) for b in names[i + 1:]}
    return found


def reliability(found: Found, labels: dict[Pair, str], held: set[str]) -> tuple[list[float], list[float], list[int]]:
    """The held half's nearest-neighbour pairs binned by score: per bin the mean score, the share that
    are the same picture, and the count."""
    kept = [p for p in filter(in_half(labels, held), found)]
    score = np.array([found[p][3] for p in kept])
    same = np.array([labels.get(p, "").startswith("near") for p in kept])
    which = np.clip(np.digitize(score, BINS) - 1, 0, len(BINS) - 2)
    inside = [which == b for b in range(len(BINS) - 1)]
    return ([float(score[m].mean()) if m.any() else float("nan") for m in inside],
            [float(same[m].mean()) if m.any() else float("nan") for m in inside], [int(m.sum()) for m in inside])


def best_threshold(distances: Found, labels: dict[Pair, str], half: set[str]) -> float:
    """The distance cut that maximises F1 on ``half``."""
    candidates = sorted(set(np.quantile([e[0] for e in distances.values()], np.linspace(0, 1, 201)).round(4)))
    return max(candidates, key=lambda t: scores({p for p, e in distances.items() if e[0] <= t}, labels, half)["f1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, default=100)
    parser.add_argument("--bursts", type=int, default=30)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gallery = sorted((museum_or_exit() / "images").glob("*.jpg"))
    rows: dict[str, dict[str, float]] = {}
    curves: dict[str, tuple[list[float], list[float], list[int]]] = {}
    timings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imgdb-dups-") as root, private_imgdb() as db:
        files, labels, (tuning, held) = build(gallery, args.sources, args.bursts, Path(root))
        tuning_half, held_half = set(tuning), set(held)
        for method in ("imagededup", "imagehash"):
            rows[f"{method} pHash (≤ {HASH_THRESHOLD} bits)"] = scores(hash_pairs(files, method), labels, held_half)
        for name, verified in (("plain", False), ("verified", True)):
            db.create_index(name, "cnn:tf_efficientnet_lite2/gem")
            db.ingest([Path(root)], index=name)
            if verified:
                db.verify_index(name)
            with db.database.connect() as conn:
                uris = dict(conn.exec_driver_sql(f"SELECT id, uri FROM images_{name}").all())
            # Learned from the tuning half's images and the distractors only: the figures are the other half's.
            learn_from = [i for i, uri in uris.items() if source_of(Path(uri).name) in tuning_half or "__" not in uri
                          and source_of(Path(uri).name) not in held_half]
            started = time.perf_counter()
            db.calibrate(name, among=learn_from)
            calibrated_in = time.perf_counter() - started
            found = neighbours(db, name, args.k, "verify" if verified else "exact")
            if not verified:
                cut = best_threshold(found, labels, tuning_half)
                rows[f"imgdb, distance ≤ {cut:.3f} (chosen on the other half)"] = scores(
                    {p for p, e in found.items() if e[0] <= cut}, labels, held_half)
            rows[f"imgdb search --min-score 0.5{' --rerank verify' if verified else ''}, hits in the {args.k} nearest"] = \
                scores({p for p, e in found.items() if e[3] >= 0.5}, labels, held_half)
            curves[name] = reliability(found, labels, held_half)
            started = time.perf_counter()
            report = db.duplicates(name, k=args.k)
            job = time.perf_counter() - started
            rows[f"imgdb duplicates, near groups{' (verified)' if verified else ' (no local features)'}"] = scores(
                grouped_pairs(report.groups, uris, "near"), labels, held_half)
            timings.append(f"{name}: calibration {calibrated_in:.1f} s, duplicates job {job:.1f} s "
                           f"({len(uris) / job:.1f} images/s, k = {args.k})")
    columns = ["precision", "recall", "f1", *EDITS, "similar as near"]
    lines = [f"Data set: {len(files)} images: {args.sources} museum paintings with {len(EDITS)} edits each, "
             f"{args.bursts} replaced by a burst of {len(BURSTS)} shots, {len(gallery) - args.sources - args.bursts} "
             f"distractors. Figures on the held-apart half ({len(held)} sources and bursts; the indexes learned "
             "their scores from the other half's images and the distractors); per edit kind: recall of (source, "
             "edit) pairs; last column: share of burst pairs taken for near.", "",
             "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |" for name, row in rows.items()]
    lines += ["", "Reliability of the calibrated score on the held-apart half (its nearest-neighbour pairs binned by "
              "score: mean score, share that are the same picture, pairs):", "",
              "| score | " + " | ".join(f"mean ({n}) | same picture ({n}) | pairs ({n})" for n in curves) + " |",
              "|---" * (1 + 3 * len(curves)) + "|"]
    for b, (low, high) in enumerate(zip(BINS, BINS[1:])):
        lines.append(f"| {low:.1f}–{high:.1f} | " + " | ".join(
            f"{mean[b]:.2f} | {same[b]:.2f} | {count[b]}" for mean, same, count in curves.values()) + " |")
    lines += ["", *(f"- {t}" for t in timings)]
    text = "\n".join(lines) + "\n"
    (args.out / "duplicates.md").write_text(text)
    plot(curves, args.out / "calibration.png")
    print(text)


def plot(curves: dict[str, tuple[list[float], list[float], list[int]]], path: Path) -> None:
    """The reliability diagram: share of the same picture against the mean score, per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, (mean, same, count) in curves.items():
        kept = [i for i, n in enumerate(count) if n >= 5]
        axes.plot([mean[i] for i in kept], [same[i] for i in kept], marker="o", label=f"{name} (bins of ≥ 5 pairs)")
    axes.set_xlabel("score (mean of the bin)")
    axes.set_ylabel("share that are the same picture")
    axes.set_title("imgdb's calibrated score, held-apart half")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
