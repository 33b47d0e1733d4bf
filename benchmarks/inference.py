"""CNN forward passes under PyTorch and ONNX Runtime, ingest with each, and cold-process searches.

    python benchmarks/inference.py [--images 96] [--repeats 5] [--out benchmarks/results]

All in one run, on this machine, nothing else running:
(a) model only: images/second of the network, pooling and whitening (``describe``) on images
    decoded and resized beforehand to one 347×260 shape, at batch 1 and batch 16, and on the
    same museum images at their own shapes (aspect kept, as ingest sees them) at batch 16, per runtime;
(b) ingest: images/second of ``Imgdb.ingest`` end to end (read, decode, resize, forward, store) of
    ``--images`` museum images into a fresh index, per runtime;
(c) cold start: wall time of a whole new process ``imgdb search photo.jpg --json`` and
    ``imgdb search id:N --json`` against a warm database, graph cached, median of ``--repeats``;
(d) JPEG draft decoding: the whole museum gallery ingested with the default extractor, and its 60
    query photos evaluated, with libjpeg's reduced-size decoding (the default) and without
    (``IMGDB_JPEG_DRAFT=0``): what the faster decoding costs in recall.
Writes ``inference.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import museum_or_exit, private_imgdb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPECS = {"default (GeM)": "cnn:tf_efficientnet_lite2/gem/whiten=off",
         "R-MAC multi-scale": "cnn:tf_efficientnet_lite2/rmac/scales=1,0.707,0.5/whiten=off"}
RUNTIMES = ("torch", "onnx")
SHAPE = (347, 260)  # (width, height): the shape of a landscape painting at the default size


def extractor_for(spec: str, runtime: str):  # noqa: ANN201
    from imgdb.catalog import extractor_context
    from imgdb.config import Settings
    from imgdb.features.registry import create_extractor

    extractor = create_extractor(spec, dataclasses.replace(extractor_context(Settings.from_env()), runtime=runtime))
    assert extractor.runtime == runtime, (spec, extractor.runtime)
    return extractor


def model_rate(extractor, images: list[Image.Image], batch: int, rounds: int = 2) -> float:  # noqa: ANN001
    """Best of ``rounds`` passes over the images, prepared beforehand, ``batch`` at a time, warm."""
    prepared = [extractor.prepare(image) for image in images]
    extractor.describe(prepared[:batch])
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(prepared), batch):
            extractor.describe(prepared[i:i + batch])
        best = max(best, len(prepared) / (time.perf_counter() - started))
    return best


def cold(command: list[str], repeats: int) -> float:
    """Median wall seconds of a new process running ``command``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return statistics.median(times)


def draft_rows(db, museum: Path) -> list[str]:  # noqa: ANN001
    """(d): ingest and eval of the museum set with and without JPEG drafts, decoding of the queries included."""
    from imgdb.features.registry import DEFAULT_SPEC

    rows, settings = [], db.settings
    gallery = sorted((museum / "images").glob("*.jpg"))
    for draft in (True, False):
        db.catalog.settings = dataclasses.replace(settings, decoding=dataclasses.replace(settings.decoding,
                                                                                          jpeg_draft=draft))
        name = f"draft_{int(draft)}"
        db.create_index(name, DEFAULT_SPEC, ann="none")
        started = time.perf_counter()
        report = db.ingest(gallery, index=name)
        rate = report.added / (time.perf_counter() - started)
        result = db.evaluate(museum, index=name)
        label = "reduced-size JPEG decoding (default)" if draft else "whole JPEGs (`IMGDB_JPEG_DRAFT=0`)"
        rows.append(f"| {label} | {rate:.1f} | {result.mAP:.3f} | {result.recall_at_1:.3f} |")
        print(rows[-1], file=sys.stderr)
    db.catalog.settings = settings
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96, help="museum images per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="cold processes per command")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    museum = museum_or_exit()
    paths = sorted((museum / "images").glob("*.jpg"))[: args.images]
    fixed = [Image.open(p).convert("RGB").resize(SHAPE, Image.Resampling.BILINEAR) for p in paths]
    own = [Image.open(p).convert("RGB") for p in paths]
    imgdb_cli = shutil.which("imgdb", path=str(Path(sys.executable).parent)) or "imgdb"
    import onnxruntime
    import torch

    import imgdb

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
               f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})")
    rows, lines = [], [f"Machine: {machine}.", ""]
    with private_imgdb() as db:
        for label, spec in SPECS.items():
            rates: dict[str, list[float]] = {}
            for runtime in RUNTIMES:
                extractor = extractor_for(spec, runtime)
                rates[runtime] = [model_rate(extractor, fixed, 1), model_rate(extractor, fixed, 16),
                                  model_rate(extractor, own, 16)]
                name = f"bench_{runtime}_{len(rows)}"
                # A handle whose settings run this runtime, on the same database.
                on_runtime = imgdb.connect(db.database.url, settings=dataclasses.replace(db.settings, runtime=runtime))
                on_runtime.create_index(name, spec, ann="none")
                started = time.perf_counter()
                report = on_runtime.ingest(paths, index=name)
                on_runtime.close()
                rates[runtime].append(report.added / (time.perf_counter() - started))
                print(f"{label} {runtime}: model b1 {rates[runtime][0]:.1f}, b16 {rates[runtime][1]:.1f}, "
                      f"own shapes b16 {rates[runtime][2]:.1f}, ingest {rates[runtime][3]:.1f} img/s", file=sys.stderr)
            best = {r: max(rates[r][:3]) for r in RUNTIMES}
            rows.append(f"| {label} | " + " | ".join(" / ".join(f"{x:.1f}" for x in rates[r][:3]) for r in RUNTIMES)
                        + f" | {best['onnx'] / best['torch']:.2f}x | "
                        + " | ".join(f"{rates[r][3]:.1f} ({rates[r][3] / max(best.values()):.0%})" for r in RUNTIMES)
                        + " |")
        # (c): the default index holds the images; a new process searches it.
        db.ingest(paths[:20])
        image_id = db.search(str(paths[3]), k=1)[0].id
        photo = str(sorted((museum / "queries").glob("*.jpg"))[0])
        env_cmd = [imgdb_cli, "search"]
        cold(env_cmd + [photo, "--json"], 1)  # (the graph is cached, the database warm)
        photo_s = cold(env_cmd + [photo, "--json"], args.repeats)
        id_s = cold(env_cmd + [f"id:{image_id}", "--json"], args.repeats)
        os.environ["IMGDB_RUNTIME"] = "torch"  # (the new processes' environment)
        torch_photo_s = cold(env_cmd + [photo, "--json"], args.repeats)
        del os.environ["IMGDB_RUNTIME"]
        drafts = draft_rows(db, museum)
    lines += ["Model-only columns: images/second at batch 1 and 16 of one 347×260 shape, then at batch 16 of the "
              "same images at their own shapes (what ingest feeds the network). Ingest columns: images/second, "
              "then that as a share of the best model-only rate of either runtime.", "",
              "| extractor | PyTorch img/s, 347×260 b1 / b16 / own shapes b16 | ONNX Runtime img/s, same "
              "| best ONNX / best PyTorch | ingest img/s, PyTorch (of the best model rate) | ingest img/s, ONNX Runtime |",
              "| --- | --- | --- | --- | --- | --- |", *rows, "",
              f"Cold `imgdb search photo.jpg --json` (new process, warm database, median of {args.repeats}): "
              f"**{photo_s:.2f} s** with ONNX Runtime, {torch_photo_s:.2f} s with `IMGDB_RUNTIME=torch`; "
              f"cold `imgdb search id:N --json`: **{id_s:.2f} s**.", "",
              "| JPEG decoding (default extractor, whole museum set) | ingest img/s | mAP | recall@1 |",
              "| --- | --- | --- | --- |", *drafts]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
