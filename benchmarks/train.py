"""Fine-tuning on the museum set, without cheating the protocol: the README's training table.

Usage: python benchmarks/train.py [--methods triplet,category,multitask,distill,cam] [--epochs N]
                                  [--out benchmarks/results]

Training never sees a query photo. Two settings, each in one private embedded PostgreSQL:

* **museum**: train on the whole gallery (287 reference images), test on the 60 query photos;
* **unseen paintings**: train on the gallery images of half of the paintings (every other image by
  name), test only on the queries whose painting is in the *other* half, against the full gallery
  (the held-out images are encoded by the trained network but were never trained on). A network
  that only memorised its training images gains nothing here.

Rows: the off-the-shelf default (``cnn:tf_efficientnet_lite2/gem``, from which every method
starts), each method, and class-weighted pooling (``cam``, a pooling: no training). ``distill``
trains ``tf_efficientnet_lite0`` at 144 px to reproduce the ``triplet`` network. Images/second is
the network's forward rate alone on the gallery (decoded beforehand), measured for every row at the
end, in turns, best of three rounds (so that no row is measured while the machine was busier), and
the rate of encoding the gallery into the new index (decoding included). Writes ``train.md`` and
``train-loss.png`` to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_only_rate, museum_or_exit, private_imgdb  # noqa: E402

BASE = "cnn:tf_efficientnet_lite2/gem"
CAM = "cnn:tf_efficientnet_lite2/cam"
STUDENT = "cnn:tf_efficientnet_lite0/gem/size=144"
METHODS = ("triplet", "category", "multitask", "distill", "cam")
LABELS = {"category": ["meta.author"], "multitask": ["meta.author", "meta.title"]}


@dataclass
class Row:
    method: str
    index: str
    museum: tuple[float, float]
    unseen: tuple[float, float]
    minutes: float
    encode_rate: float
    losses: list[float]
    model_rate: float = 0.0


def unseen_dataset(museum: Path, root: Path) -> tuple[Path, list[Path]]:
    """A data set folder (symlinks) with the full gallery and only the queries of held-out
    paintings; and the gallery images of the training half."""
    gallery = sorted((museum / "images").glob("*.jpg"))
    train = gallery[::2]
    held_out = {f"images/{p.name}" for p in gallery[1::2]}
    (root / "images").mkdir(parents=True)
    for path in gallery:
        (root / "images" / path.name).symlink_to(path)
    (root / "queries").symlink_to(museum / "queries")
    (root / "metadata.json").symlink_to(museum / "metadata.json")
    queries = json.loads((museum / "queries.json").read_text())
    (root / "queries.json").write_text(json.dumps([q for q in queries if set(q["relevant"]) <= held_out]))
    return root, train


def score(db, dataset: Path, index: str) -> tuple[float, float]:  # noqa: ANN001

    report = db.evaluate(dataset, index=index)
    return report.mAP, report.recall_at_1


def main() -> None:
    from imgdb.training.trainer import TrainOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=TrainOptions.epochs)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if "distill" in methods and "triplet" not in methods:
        sys.exit("distill learns from the triplet network: keep triplet in --methods")
    museum = museum_or_exit()
    gallery = sorted((museum / "images").glob("*.jpg"))
    options = TrainOptions(epochs=args.epochs)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, private_imgdb() as db:
        unseen, train_half = unseen_dataset(museum, Path(tmp) / "unseen")
        queries = len(json.loads((unseen / "queries.json").read_text()))
        print(f"unseen paintings: {len(train_half)} training images, {queries} queries", file=sys.stderr)
        encoded = {}
        for name, images in (("base", gallery), ("half", train_half)):
            db.create_index(name, BASE)
            encoded[name] = db.ingest(images, index=name, metadata_file=museum / "metadata.json")
        rows.append(Row("off-the-shelf", "base", score(db, museum, "base"), score(db, unseen, "base"), 0.0,
                        encoded["base"].added / encoded["base"].seconds, []))
        for method in methods:
            if method == "cam":
                db.create_index("cam", CAM)
                report = db.ingest(gallery, index="cam", metadata_file=museum / "metadata.json")
                rows.append(Row("cam (pooling)", "cam", score(db, museum, "cam"), score(db, unseen, "cam"), 0.0,
                                report.added / report.seconds, []))
                continue
            started = time.monotonic()
            kwargs = {"method": method, "label_keys": LABELS.get(method, []), "options": options,
                      "student": STUDENT if method == "distill" else None}
            source = ("m_triplet", "h_triplet") if method == "distill" else ("base", "half")
            full = db.train_network(f"m_{method}", source[0], **kwargs)
            minutes = (time.monotonic() - started) / 60
            db.train_network(f"h_{method}", source[1], **kwargs)
            row = Row(method, f"m_{method}", score(db, museum, f"m_{method}"), score(db, unseen, f"h_{method}"),
                      minutes, full.encoded.added / full.encoded.seconds, full.losses)
            rows.append(row)
            print(f"{method}: museum {row.museum}, unseen {row.unseen}, {minutes:.1f} min", file=sys.stderr, flush=True)
        for _ in range(3):
            for row in rows:
                row.model_rate = max(row.model_rate, model_only_rate(db.catalog.extractor(db.index(row.index)), gallery))
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, len(gallery), queries)
    (args.out / "train.md").write_text(table)
    plot([r for r in rows if r.losses], args.out / "train-loss.png")
    print(table)


def markdown(rows: list[Row], images: int, unseen_queries: int) -> str:
    head = ("| method | museum mAP | museum recall@1 | unseen mAP | unseen recall@1 | training min "
            "| img/s (network) | img/s (encoding) |\n|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r.method} | {r.museum[0]:.3f} | {r.museum[1]:.3f} | {r.unseen[0]:.3f} | {r.unseen[1]:.3f} "
             f"| {r.minutes:.1f} | {r.model_rate:.1f} | {r.encode_rate:.1f} |" for r in rows]
    note = (f"\nMuseum: trained on the {images} gallery images, 60 query photos. Unseen paintings: trained on "
            f"half of the gallery, {unseen_queries} queries of the other half, against the full gallery. "
            "Training minutes: the museum training (reading, synthetic views, epochs, encoding the new index).\n")
    return head + "\n".join(lines) + "\n" + note


def plot(rows: list[Row], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6), layout="constrained")
    axes = figure.subplots()
    for row in rows:
        axes.plot(range(1, len(row.losses) + 1), row.losses, marker="o", label=row.method)
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss (mean per step)")
    axes.set_yscale("log")
    axes.set_title("Fine-tuning on the museum gallery")
    axes.legend()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
