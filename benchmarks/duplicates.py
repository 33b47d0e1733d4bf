"""Near duplicates: how well imgdb tells *the same picture* from a different one, against the hash tools.

    python benchmarks/duplicates.py [--sources 100] [--bursts 30] [--k 10] [--out benchmarks/results]

The data set is built in a temporary folder from the museum gallery (seeded): ``--sources`` paintings
each get one edited copy per kind in :data:`EDITS` (re-encoded, resized, cropped, rotated, colours
changed, captioned, pasted into a larger frame); ``--bursts`` other paintings are replaced by two
"burst" shots of the scene (:data:`BURSTS`: each shows a part the other does not, as a camera that
moved between shots), which are *similar*, not the same picture; the other paintings stay as
distractors, unedited. Ground truth: every pair within one source's picture and its edits is
``near``; the two shots of a burst are ``similar`` and must never be taken for ``near``.

Methods, each predicting which pairs are ``near`` (pairs, before any grouping):

- imagededup's PHash at its default ``max_distance_threshold`` (10 of 64 bits), and imagehash's pHash
  at the same Hamming distance (imagehash documents no threshold of its own);
- imgdb today, the default CNN descriptor, each image's ``--k`` nearest through the index: a pair is
  near when its cosine distance is under a threshold chosen to maximise F1 on the first half of the
  sources and applied to the other half (held apart: the figures are the second half's);
- imgdb with spatial verification (``imgdb index verify``, ``--rerank verify``): a pair is near when the
  hit is verified; and, a prototype, when it is verified and its inliers span at least a share of one
  of the two images (:func:`coverage`; the share chosen on the first half).

Figures: pairwise precision, recall and F1 over the held-apart half, recall per edit kind (pairs of a
source and its edit), and how many burst pairs each method took for ``near``; and two prototypes of a
calibrated score (:func:`calibrated`), with their reliability on the held-apart half. Writes
``duplicates.md``.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import sys
import tempfile
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


Found = dict[Pair, tuple[float, bool, int]]


def neighbours(db, index: str, k: int, rerank: str) -> Found:  # noqa: ANN001
    """Every image's k nearest (itself left out): the pair's distance, whether it verified and its
    inliers (of the direction with more, where both images found the other)."""
    with db.database.connect() as conn:
        ids = dict(conn.exec_driver_sql(f"SELECT id, uri FROM images_{index}").all())
    found: Found = {}
    for image_id, uri in ids.items():
        for hit in db.search(f"id:{image_id}", k=k + 1, index=index, rerank=rerank, candidates=k + 1):
            if hit.id != image_id:
                key = pair(Path(uri).name, Path(hit.uri).name)
                mine = (hit.distance, bool(hit.notes.get("verified")), int(hit.notes.get("inliers", 0)))
                found[key] = max(mine, found.get(key, mine), key=lambda evidence: (evidence[2], -evidence[0]))
    return found


def coverage(found: Found, root: Path, local: str) -> dict[Pair, float]:
    """Of each verified pair, how much of the more covered image the inliers span (the convex hull of
    its inlier keypoints over its detection frame): near 1 when one image shows the whole of the other
    (a crop, an inset, a caption), lower for two shots that each show a part the other lacks. A
    prototype of a test the duplicates job could make, on the features extracted from the files."""
    import cv2

    from imgdb.config import Settings
    from imgdb.features import keypoints
    from imgdb.features.local import grey
    from imgdb.io.reader import decode
    from imgdb.query.verify import verify

    spec, limits = keypoints.parse_keypoints(local), Settings().decoding
    cache: dict[str, tuple[object, tuple[int, int]]] = {}

    def features(name: str) -> tuple[object, tuple[int, int]]:
        if name not in cache:
            pixels = decode((root / name).read_bytes(), limits=limits, scale_hint=spec.scale_hint).pixels
            cache[name] = (spec.extract(pixels), grey(pixels, spec.side).shape)
        return cache[name]

    def spanned(xy: np.ndarray, shape: tuple[int, int]) -> float:
        return float(cv2.contourArea(cv2.convexHull(xy.astype(np.float32)))) / (shape[0] * shape[1])

    shares = {}
    for key, (_, verified, _) in found.items():
        if verified:
            (mine, my_shape), (theirs, their_shape) = features(key[0]), features(key[1])
            verdict = verify(mine.xy, mine.descriptors, theirs.xy, theirs.descriptors)
            shares[key] = 0.0 if len(verdict.pairs) < 3 else max(spanned(mine.xy[verdict.pairs[:, 0]], my_shape),
                                                                  spanned(theirs.xy[verdict.pairs[:, 1]], their_shape))
    return shares


def calibrated(found: Found, spans: dict[Pair, float], labels: dict[Pair, str], tuning: set[str],
               held: set[str]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """A score in [0, 1], the estimated probability that a pair is the same picture: a logistic
    regression learned on the tuning half's nearest-neighbour pairs, of their distance alone, and of
    their distance, log(1 + inliers) and inlier span. On the held half: the figures of the pairs it
    scores 0.5 or more, and its reliability (pairs binned by score: the share that are the same picture)."""
    from sklearn.linear_model import LogisticRegression

    models = {"distance": lambda p: [found[p][0]],
              "distance, inliers, span": lambda p: [found[p][0], np.log1p(found[p][2]), spans.get(p, 0.0)]}
    rows, bins = {}, np.linspace(0, 1, 11)
    header = ["| score | " + " | ".join(f"pairs ({name}) | same picture ({name})" for name in models) + " |",
              "|---" * (1 + 2 * len(models)) + "|"]
    table: list[list[str]] = [[f"{low:.1f}–{high:.1f}"] for low, high in zip(bins, bins[1:])]
    for name, evidence in models.items():
        split = {half_name: list(filter(in_half(labels, half), found)) for half_name, half in
                 (("tuning", tuning), ("held", held))}
        truth = {half_name: np.array([labels.get(p, "").startswith("near") for p in pairs])
                 for half_name, pairs in split.items()}
        model = LogisticRegression().fit(np.array([evidence(p) for p in split["tuning"]]), truth["tuning"])
        score = model.predict_proba(np.array([evidence(p) for p in split["held"]]))[:, 1]
        rows[f"imgdb, score ≥ 0.5 from {name} (learned on the other half)"] = scores(
            {p for p, probability in zip(split["held"], score) if probability >= 0.5}, labels, held)
        which = np.clip(np.digitize(score, bins) - 1, 0, len(bins) - 2)
        for b, cells in enumerate(table):
            inside = which == b
            cells += [str(int(inside.sum())), f"{truth['held'][inside].mean():.2f}" if inside.any() else "-"]
    return rows, header + ["| " + " | ".join(cells) + " |" for cells in table]


def best_threshold(distances: Found, labels: dict[Pair, str], half: set[str]) -> float:
    """The distance cut that maximises F1 on ``half``."""
    candidates = sorted(set(np.quantile([d for d, _, _ in distances.values()], np.linspace(0, 1, 201)).round(4)))
    return max(candidates, key=lambda t: scores({p for p, (d, _, _) in distances.items() if d <= t}, labels, half)["f1"])


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
    with tempfile.TemporaryDirectory(prefix="imgdb-dups-") as root, private_imgdb() as db:
        files, labels, (tuning, held) = build(gallery, args.sources, args.bursts, Path(root))
        tuning_half, held_half = set(tuning), set(held)
        for method in ("imagededup", "imagehash"):
            rows[f"{method} pHash (≤ {HASH_THRESHOLD} bits)"] = scores(hash_pairs(files, method), labels, held_half)
        db.create_index("dups", "cnn:tf_efficientnet_lite2/gem")
        db.ingest([Path(root)], index="dups")
        distances = neighbours(db, "dups", args.k, "exact")
        cut = best_threshold(distances, labels, tuning_half)
        rows[f"imgdb, distance ≤ {cut:.3f} (chosen on the other half)"] = scores(
            {p for p, (d, _, _) in distances.items() if d <= cut}, labels, held_half)
        db.verify_index("dups")
        verified = neighbours(db, "dups", args.k, "verify")
        rows["imgdb, verified (--rerank verify)"] = scores({p for p, (_, ok, _) in verified.items() if ok}, labels,
                                                           held_half)
        spans = coverage(verified, Path(root), db.index("dups").local)
        least = max(np.linspace(0, 1, 101), key=lambda c: scores({p for p, share in spans.items() if share >= c},
                                                                   labels, tuning_half)["f1"])
        rows[f"imgdb, verified, inliers span ≥ {least:.2f} of an image (chosen on the other half)"] = scores(
            {p for p, share in spans.items() if share >= least}, labels, held_half)
        learned, reliability = calibrated(verified, spans, labels, tuning_half, held_half)
        rows.update(learned)
    columns = ["precision", "recall", "f1", *EDITS, "similar as near"]
    lines = [f"Data set: {len(files)} images: {args.sources} museum paintings with {len(EDITS)} edits each, "
             f"{args.bursts} replaced by a burst of {len(BURSTS)} shots, {len(gallery) - args.sources - args.bursts} "
             f"distractors. Figures on the held-apart half ({len(held)} sources and bursts); per edit kind: recall "
             "of (source, edit) pairs; last column: share of burst pairs taken for near.", "",
             "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |" for name, row in rows.items()]
    lines += ["", "Reliability of the learned scores on the held-apart half (its nearest-neighbour pairs binned "
              "by score; *same picture*: the share of the bin that is):", "", *reliability]
    text = "\n".join(lines) + "\n"
    (args.out / "duplicates.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
