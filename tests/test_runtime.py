"""The CNN forward pass under ONNX Runtime against PyTorch, the cached graph, and a search process
that never loads torch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgdb.catalog import extractor_context
from imgdb.config import Settings
from imgdb.features import runtimes
from imgdb.features.base import ExtractorContext
from imgdb.features.cnn import CnnExtractor
from imgdb.features.cnn_config import CnnConfig
from imgdb.jobs.evaluate import average_precision
from imgdb.features.onnx_net import graph_key
from imgdb.features.pooling_kinds import KINDS
from imgdb.features.spec import parse_spec

POOLING_SPECS = [f"cnn:tf_efficientnet_lite0/{name}/size=160" for name in KINDS] + [
    "cnn:tf_efficientnet_lite0@blocks.4/rmac/size=160/scales=1,0.707"]


def context(runtime: str) -> ExtractorContext:
    """What the session's settings give an extractor, under ``runtime``."""
    return replace(extractor_context(Settings.from_env()), runtime=runtime)


def _images(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def _both(spec: str) -> tuple[CnnExtractor, CnnExtractor]:
    config = CnnConfig.parse(parse_spec(spec))
    return CnnExtractor(config, context("onnx")), CnnExtractor(config, context("torch"))


@pytest.mark.parametrize("spec", POOLING_SPECS)
def test_onnx_runtime_gives_pytorchs_vectors_and_rankings(museum: Path, spec: str) -> None:
    onnx, torch_ = _both(spec)
    assert (onnx.runtime, torch_.runtime) == ("onnx", "torch") and onnx.dim == torch_.dim
    gallery = sorted((museum / "images").glob("*.jpg"))[:8]
    queries = sorted((museum / "queries").glob("*.jpg"))[:3]
    images = _images(gallery + queries)  # (paintings and photos: many aspect ratios, so many map sizes)
    got, want = ([e.embed([e.prepare(i) for i in images]) for e in (onnx, torch_)])
    assert float(np.min(np.sum(got * want, axis=1))) >= 0.9999
    for vectors in (got, want):
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    ranks = [np.argsort(((v[8:, None] - v[None, :8]) ** 2).sum(-1), axis=1) for v in (got, want)]
    np.testing.assert_array_equal(*ranks)


def test_images_of_many_shapes_run_side_by_side_with_the_vectors_of_one_at_a_time(museum: Path) -> None:
    extractor = CnnExtractor(CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/gem/size=128")), context("onnx"))
    prepared = [extractor.prepare(i) for i in _images(sorted((museum / "queries").glob("*.jpg"))[:6])]
    assert len({p[0].shape for p in prepared}) > 1  # (photos of several aspect ratios: several passes)
    together = extractor.embed(prepared)
    one_by_one = np.concatenate([extractor.embed([p]) for p in prepared])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_normalising_is_the_per_channel_formula(museum: Path) -> None:
    extractor = CnnExtractor(CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/gem/size=128")), context("onnx"))
    pixels = np.asarray(_images(sorted((museum / "queries").glob("*.jpg"))[:1])[0])[::7, ::5]  # (not contiguous)
    mean, std = (np.asarray(v, dtype=np.float32) * 255 for v in (extractor.network.mean, extractor.network.std))
    want = ((pixels.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    got = extractor.normalise(pixels)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_onnx_runtime_gives_the_same_retrieval_figures(museum_sample: Path) -> None:
    """mAP of the museum sample's queries, default extractor, under each runtime."""
    onnx, torch_ = _both("cnn:tf_efficientnet_lite2/gem/whiten=off")
    gallery = sorted((museum_sample / "images").glob("*.jpg"))
    queries = json.loads((museum_sample / "queries.json").read_text())
    names = [f"images/{p.name}" for p in gallery]
    figures = []
    for extractor in (onnx, torch_):
        base = extractor.embed([extractor.prepare(i) for i in _images(gallery)])
        photos = extractor.embed([extractor.prepare(i) for i in _images([museum_sample / q["query"] for q in queries])])
        order = np.argsort(-(photos @ base.T), axis=1)
        figures.append([average_precision(np.isin(np.asarray(names)[row], q["relevant"])) for row, q in zip(order, queries)])
    assert len(figures[0]) >= 5
    assert figures[0] == figures[1]


def test_the_graph_is_exported_once_and_re_exported_when_damaged(imgdb_home: Path, museum: Path) -> None:
    config = CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/max/size=96"))
    graph = imgdb_home / "cache" / "onnx" / f"{graph_key(config)}.onnx"
    runtimes._sessions.clear()
    first = CnnExtractor(config, context("onnx"))
    assert graph.is_file()
    stamp = graph.stat().st_mtime_ns
    CnnExtractor(config, context("onnx"))
    assert graph.stat().st_mtime_ns == stamp  # read back, not exported again
    image = _images(sorted((museum / "images").glob("*.jpg"))[:1])
    vector = first.embed([first.prepare(image[0])])
    graph.write_bytes(b"not a graph")
    runtimes._sessions.clear()  # (a new process: the session in memory is gone)
    again = CnnExtractor(config, context("onnx"))
    assert again.runtime == "onnx" and graph.stat().st_size > 1000
    np.testing.assert_allclose(again.embed([again.prepare(image[0])]), vector, atol=1e-6)
    # A different network is a different graph: the key follows what determines it.
    assert graph_key(CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/max/size=200"))) == graph_key(config)
    assert graph_key(CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/gem/size=96"))) != graph_key(config)
    assert graph_key(CnnConfig.parse(parse_spec(f"cnn:tf_efficientnet_lite0/max/size=96/net={'a' * 64}"))) != graph_key(config)


def test_a_network_that_does_not_export_runs_on_pytorch(imgdb_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/avg/size=96"))
    cache = imgdb_home / "cache" / "onnx"
    cache.mkdir(parents=True, exist_ok=True)
    marker = cache / f"{graph_key(config)}.failed"
    marker.write_text("tf_efficientnet_lite0 does not export to ONNX (a test's stand-in for an exporter error)")
    runtimes._sessions.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="imgdb.features.runtimes"):
            extractor = CnnExtractor(config, context("onnx"))
        assert extractor.runtime == "torch"
        assert "does not export to ONNX" in caplog.text and "runs on PyTorch" in caplog.text
    finally:
        marker.unlink()


def test_a_search_imports_neither_torch_nor_sqlalchemy(client, museum: Path, imgdb_home: Path) -> None:  # noqa: ANN001
    """A new process that searches by photo and by id (graph cached, database warm) loads no torch,
    timm or torchvision, and no SQLAlchemy or alembic: only what the search path needs."""
    client.create_index("runtime_probe", "cnn:tf_efficientnet_lite0/gem/size=128")
    gallery = sorted((museum / "images").glob("*.jpg"))[40:44]
    client.ingest(gallery, index="runtime_probe")
    script = (
        "import sys, imgdb\n"
        "with imgdb.connect() as db:\n"
        f"    by_photo = db.search(open({str(gallery[2])!r}, 'rb').read(), k=2, index='runtime_probe')\n"
        "    by_id = db.search(f'id:{by_photo[0].id}', k=2, index='runtime_probe')\n"
        "print(by_photo[0].uri, by_id[0].uri)\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules}\n"
        "                      & {'torch', 'timm', 'torchvision', 'sqlalchemy', 'alembic'})))\n"
    )
    env = {**os.environ, "IMGDB_HOME": str(imgdb_home)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    found, loaded = done.stdout.splitlines()
    assert found.split() == [str(gallery[2])] * 2
    assert loaded == ""
    client.drop_index("runtime_probe")


def test_a_cache_that_cannot_be_written_costs_an_export_not_the_search(tmp_path: Path, museum: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    from imgdb.features.onnx_net import OnnxNetwork

    blocked = tmp_path / "home-cache"
    blocked.write_text("a file where the cache directory would go")
    config = CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/max/size=96"))
    with caplog.at_level(logging.WARNING, logger="imgdb.features.onnx_net"):
        network = OnnxNetwork(config, blocked / "onnx", "cpu")
    assert "exported for this process only" in caplog.text
    extractor = CnnExtractor(config, context("torch"))
    image = _images(sorted((museum / "images").glob("*.jpg"))[:1])[0]
    batch = np.stack(extractor.prepare(image))
    got, want = network.run(batch), extractor.network.run(batch)
    assert float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.9999


def test_an_unknown_runtime_is_refused_with_the_choices() -> None:
    from imgdb.errors import ExtractorSpecError

    with pytest.raises(ExtractorSpecError, match="IMGDB_RUNTIME='tensorflow': use onnx or torch"):
        CnnExtractor(CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/max/size=96")), context("tensorflow"))


def test_a_network_loaded_for_maps_gives_pytorchs_maps_under_onnx_runtime(museum: Path) -> None:
    """What ``cnnvlad`` aggregates: the map after an intermediate stage, unpooled, from its own graph
    (the pooled graph of the same config is another file in the cache)."""
    config = CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0@blocks.4/gem/size=160"))
    onnx, torch_ = (CnnExtractor(config, context(runtime), maps=True) for runtime in ("onnx", "torch"))
    assert (onnx.runtime, torch_.runtime) == ("onnx", "torch")
    assert graph_key(config, maps=True) != graph_key(config)
    images = _images(sorted((museum / "images").glob("*.jpg"))[:3])
    arrays = [onnx.prepare(image)[0] for image in images]
    for got, want, array in zip(onnx.maps(arrays), torch_.maps(arrays), arrays):
        assert got.shape == want.shape == (onnx.dim, -(-array.shape[1] // 16), -(-array.shape[2] // 16))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * float(np.abs(want).max()))
