"""Fine-tuning: the losses and the mining against direct computations, the retrieval module against
the backbone's own maths, and ``imgdb train`` end to end on real images with real weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from imgdb.db import networks, vectors
from imgdb.errors import ExtractorSpecError, ImgdbError
from imgdb.features.base import l2_normalize
from imgdb.features.base import ExtractorContext
from imgdb.features.cnn import CnnExtractor
from imgdb.features.cnn_config import CnnConfig
from imgdb.features.network import deserialize, serialize, trunk_stages
from imgdb.features.torch_net import build_net
from imgdb.features.pooling import POOLINGS
from imgdb.features.spec import parse_spec
from imgdb.features.whitening import learn_projection, project
from imgdb.training import losses
from imgdb.training.augment import photo_of
from imgdb.training.mining import hard_negatives
from imgdb.training.trainer import TrainOptions
from tests.conftest import QUICK_TRAINING, SAMPLE_SIZE

QUICK = TrainOptions(**QUICK_TRAINING)


def embed_in_a_new_process(query: Path, index: str, home: Path) -> np.ndarray:
    """``embed`` of ``query`` in ``index``, computed by a fresh Python process on the same database."""
    code = ("import imgdb, sys; v = imgdb.connect().embed(sys.argv[1], index=sys.argv[2]); "
            "sys.stdout.write(v.astype('<f4').tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code, str(query), index], capture_output=True, text=True,
                         check=True, env={**os.environ, "IMGDB_HOME": str(home)})
    return np.frombuffer(bytes.fromhex(out.stdout), "<f4")


def _unit(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=shape).astype(np.float32)), dim=-1)


# ------------------------------------------------------------------ losses, by hand


def test_triplet_loss_is_the_hinge_on_distances() -> None:
    rng = np.random.default_rng(0)
    a, p, n = _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 4, 3, 8)
    expected = np.mean([max(0.0, float(np.linalg.norm(a[i] - p[i]) - np.linalg.norm(a[i] - n[i, j]) + 0.3))
                        for i in range(4) for j in range(3)])
    assert float(losses.triplet(a, p, n, margin=0.3)) == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_pulls_positives_and_pushes_negatives_to_the_margin() -> None:
    rng = np.random.default_rng(1)
    a, p, n = _unit(rng, 3, 6), _unit(rng, 3, 6), _unit(rng, 3, 2, 6)
    pairs = [0.5 * float(np.linalg.norm(a[i] - p[i])) ** 2 for i in range(3)]
    pairs += [0.5 * max(0.0, 1.2 - float(np.linalg.norm(a[i] - n[i, j]))) ** 2 for i in range(3) for j in range(2)]
    assert float(losses.contrastive(a, p, n, margin=1.2)) == pytest.approx(np.mean(pairs), rel=1e-5)


def test_classification_leaves_unlabelled_images_out() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, -9.0, 0.0]])
    labels = torch.tensor([0, losses.NO_LABEL, 2])
    expected = np.mean([-np.log(np.exp(r[c]) / np.exp(r).sum()) for r, c in ((logits[0].numpy(), 0), (logits[2].numpy(), 2))])
    assert float(losses.classification(logits, labels)) == pytest.approx(expected, rel=1e-5)
    assert float(losses.classification(logits, torch.full((3,), losses.NO_LABEL))) == 0.0


def test_cosine_head_scores_scaled_cosines_of_the_descriptor_and_each_class() -> None:
    head = losses.CosineHead(4, 3, scale=10.0)
    x = torch.tensor([[3.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    w = head.weight.detach().numpy()
    expected = [[10.0 * float(np.dot(r, c) / np.linalg.norm(r) / np.linalg.norm(c)) for c in w] for r in x.numpy()]
    np.testing.assert_allclose(head(x).detach().numpy(), expected, rtol=1e-5)


def test_distillation_is_kl_between_in_batch_similarity_softmaxes() -> None:
    rng = np.random.default_rng(2)
    s, t, tau = _unit(rng, 5, 4), _unit(rng, 5, 7), 0.1  # (the teacher's dimension may differ)
    total = 0.0
    for i in range(5):
        others = [j for j in range(5) if j != i]
        ps = np.exp([float(s[i] @ s[j]) / tau for j in others])
        pt = np.exp([float(t[i] @ t[j]) / tau for j in others])
        ps, pt = ps / ps.sum(), pt / pt.sum()
        total += float(np.sum(pt * np.log(pt / ps)))
    assert float(losses.distillation(s, t, tau)) == pytest.approx(total / 5, rel=1e-4)
    assert float(losses.distillation(t, t, tau)) == pytest.approx(0.0, abs=1e-6)


def test_hard_negatives_are_the_nearest_images_that_are_not_positives() -> None:
    rng = np.random.default_rng(3)
    gallery = l2_normalize(rng.normal(size=(30, 16)))
    queries = l2_normalize(gallery[:10] + 0.1 * rng.normal(size=(10, 16)))  # near their own image
    positives = [{i, (i + 1) % 30} for i in range(10)]  # its image, and one more showing the same
    negatives = hard_negatives(queries, gallery, positives, 4)
    for i, row in enumerate(negatives):
        assert not set(row.tolist()) & positives[i]
        allowed = [j for j in np.argsort(-(gallery @ queries[i])) if j not in positives[i]]
        assert row.tolist() == allowed[:4]
    with pytest.raises(ValueError, match="fewer than"):
        hard_negatives(queries, gallery[:5], positives, 4)


def test_photos_of_a_picture_are_seeded_and_stay_images(museum: Path) -> None:
    pixels = np.asarray(Image.open(museum / "images" / "bbdd_00003.jpg").convert("RGB").reduce(4))
    one = [photo_of(pixels, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(one[0], one[1])
    views = [photo_of(pixels, np.random.default_rng(seed)) for seed in range(8)]
    assert all(v.dtype == np.uint8 and v.ndim == 3 and v.shape[2] == 3 and min(v.shape[:2]) >= 8 for v in views)
    assert len({v.tobytes() for v in views}) == 8


# ------------------------------------------------------------------ the retrieval module


def _museum_images(museum: Path, count: int) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((museum / "images").glob("*.jpg"))[:count]]


@pytest.mark.parametrize("spec", ["cnn:tf_efficientnet_lite2/gem", "cnn:tf_efficientnet_lite2@blocks.4/rmac",
                                  "cnn:tf_efficientnet_lite0/crow/size=160/whiten=on"])
def test_the_module_reproduces_the_backbones_own_maths(museum: Path, spec: str) -> None:
    """Descriptors as the extractor computed them before it was one module: timm's own forward,
    the pooling function, numpy's whitening, numpy's L2."""
    extractor = CnnExtractor(CnnConfig.parse(parse_spec(spec)), ExtractorContext(runtime="torch"))
    images = _museum_images(museum, 6)
    prepared = [extractor.prepare(image) for image in images]
    config, model = extractor.config, extractor.model
    pooled = []
    with torch.inference_mode():
        for (array,) in prepared:
            x = torch.from_numpy(array)[None]
            if config.layer:
                index = [i["module"] for i in model.feature_info].index(config.layer)
                fmap = model.forward_intermediates(x, indices=[index], intermediates_only=True, stop_early=True)[0]
            else:
                fmap = model.forward_features(x)
            pooled.append(POOLINGS[config.pooling].fn(fmap, **dict(config.params))[0].numpy())
    expected = np.stack(pooled)
    if config.whiten == "on":
        state = learn_projection(l2_normalize(expected), extractor.dim, whiten=True)
        extractor.load_state({"whitened": np.ones(1, np.float32), **state})
        expected = project(l2_normalize(expected), state, extractor.dim)
    np.testing.assert_allclose(extractor.embed(prepared), l2_normalize(expected), atol=2e-6)


def test_trunk_stages_run_in_sequence_are_forward_features() -> None:
    for name in ("tf_efficientnet_lite0", "resnet18"):
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, 3, 96, 128)
        with torch.inference_mode():
            y = x
            for _, stage in trunk_stages(model):
                y = stage(y)
            assert torch.allclose(y, model.forward_features(x), atol=1e-5)


def test_trained_weights_round_trip_by_their_hash(museum: Path) -> None:
    config = CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0/gem/size=128"))
    extractor = CnnExtractor(config, ExtractorContext(runtime="torch"))
    net = build_net(config, extractor.model)
    net.detach_from(len(net.stages) - 1)
    net.identity_whitening()
    with torch.no_grad():
        net.pool.p.fill_(4.0)
        net.whiten.weight.mul_(0.5)
        next(net.stages[-1].parameters()).add_(0.01)
    sha, blob = serialize(net.trained_state())
    assert sha == hashlib.sha256(blob).hexdigest() == serialize(net.trained_state())[0]
    assert next(extractor.net.stages[-1].parameters()).data_ptr() != next(net.stages[-1].parameters()).data_ptr()
    again = build_net(config, extractor.model)
    again.load_trained(deserialize(blob))
    x = torch.from_numpy(extractor.prepare(_museum_images(museum, 1)[0])[0])[None]
    with torch.inference_mode():
        assert torch.equal(net.eval()(x), again.eval()(x))
        assert not torch.allclose(extractor.net(x), net(x))  # (the shared backbone did not change)
    with pytest.raises(ExtractorSpecError, match="safetensors"):
        deserialize(blob[:100])
    other = build_net(CnnConfig.parse(parse_spec("cnn:tf_efficientnet_lite0@blocks.4/gem")), extractor.model)
    with pytest.raises(ExtractorSpecError, match="do not fit"):
        other.load_trained(deserialize(blob))


def test_net_specs_name_weights_by_hash() -> None:
    sha = "ab" * 32
    config = CnnConfig.parse(parse_spec(f"cnn:tf_efficientnet_lite2/gem/net={sha}"))
    assert str(config) == f"cnn:tf_efficientnet_lite2/gem/p=3/size=260/whiten=auto/net={sha}"
    with pytest.raises(ExtractorSpecError, match="sha256"):
        CnnConfig.parse(parse_spec(f"cnn:tf_efficientnet_lite2/net={sha[:10]}"))
    with pytest.raises(ExtractorSpecError, match="lives in the database of its index"):
        CnnExtractor(config)  # (no context to read it from: an extractor has no hidden inputs)


def test_a_weights_file_is_stored_by_hash_and_no_longer_needed(client, museum: Path, tmp_path: Path,  # noqa: ANN001
                                                               imgdb_home: Path) -> None:
    weights = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    from_file = CnnExtractor(CnnConfig.parse(parse_spec(f"cnn:resnet18/gem/size=128/weights={weights}")))
    info = client.create_index("from_file", f"cnn:resnet18/gem/size=128/weights={weights}", ann="none")
    assert "weights=" not in info.extractor and "/net=" in info.extractor
    sha = parse_spec(info.extractor).options["net"]
    with client.database.connect() as conn:
        assert networks.record(conn, sha).params == {"file": str(weights)}
    query = museum / "queries" / "qsd1_w1_00002.jpg"
    here = client.embed(query, index="from_file")
    np.testing.assert_array_equal(here, from_file.embed([from_file.prepare(Image.open(query).convert("RGB"))])[0])
    weights.unlink()  # the index does not need the file any more, in this process or another
    assert np.array_equal(embed_in_a_new_process(query, "from_file", imgdb_home), here)


# ------------------------------------------------------------------ imgdb train, end to end


@pytest.fixture(scope="session")
def trained(tuned_index):  # noqa: ANN001, ANN201
    report, epochs = tuned_index
    assert [e for e, _ in epochs] == [1, 2]
    return report


def test_train_makes_an_index_of_the_fine_tuned_network(client, trained, sample_ids: list[int],  # noqa: ANN001
                                                        museum: Path) -> None:
    assert trained.to_json()["index"] == "tuned" and trained.method == "triplet"
    # (the default index is a cnnvlad one: training tunes its backbone under GeM, into a cnn: index)
    assert trained.extractor == f"cnn:tf_efficientnet_lite2/gem/p=3/size=260/whiten=off/net={trained.network}"
    target = client.index("tuned")
    assert target.extractor == trained.extractor and target.dim == 1280  # (EfficientNet-Lite2's channels)
    with client.database.connect() as conn:
        row = networks.record(conn, trained.network)
        # (every image the source held when it was trained: other tests may add some later)
        assert vectors.count(conn, target) == trained.images >= SAMPLE_SIZE
    assert hashlib.sha256(row.weights).hexdigest() == trained.network
    assert row.method == "triplet" and row.images == trained.images and len(row.loss) == 2
    assert row.params["from"] == "default"
    hits = client.search(f"id:{sample_ids[3]}", index="tuned", k=1)
    assert hits[0].id == sample_ids[3]
    photo = museum / "images" / "bbdd_00004.jpg"
    untuned = CnnExtractor(CnnConfig.parse(parse_spec(trained.extractor.rpartition("/net=")[0])))
    before = untuned.embed([untuned.prepare(Image.open(photo).convert("RGB"))])[0]
    assert not np.allclose(before, client.embed(photo, index="tuned"), atol=1e-3)  # it did learn something


def test_a_trained_index_encodes_a_query_bit_for_bit_in_a_new_process(client, trained, museum: Path,  # noqa: ANN001
                                                                      imgdb_home: Path) -> None:
    query = museum / "queries" / "qsd1_w1_00000.jpg"
    here = client.embed(query, index="tuned")
    assert np.array_equal(embed_in_a_new_process(query, "tuned", imgdb_home), here)


def test_category_and_distill_train_with_their_heads_and_student(client, sample_index: str,  # noqa: ANN001
                                                                 sample_ids: list[int]) -> None:
    category = client.train_network("by_author", sample_index, method="category", label_keys=["meta.author"],
                                    options=QUICK)
    student = client.train_network("student", sample_index, method="distill", student="tf_efficientnet_lite0",
                                   options=QUICK)
    assert category.method == "category" and category.losses[-1] > 0
    assert student.extractor.startswith("cnn:tf_efficientnet_lite0/gem/p=3/size=260/whiten=off/net=")
    with client.database.connect() as conn:
        assert networks.record(conn, category.network).params["label_keys"] == ["meta.author"]
    assert client.search(f"id:{sample_ids[5]}", index="student", k=1)[0].id == sample_ids[5]


def test_a_time_budget_stops_training_after_the_epoch_that_reaches_it(client, sample_index: str) -> None:  # noqa: ANN001
    from dataclasses import replace

    report = client.train_network("budget", sample_index, options=replace(QUICK, epochs=50, time_budget=0.01))
    assert len(report.losses) == 1


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"method": "siamese"}, "unknown method"),
    ({"method": "category"}, "one --label-key"),
    ({"method": "multitask", "label_keys": ["meta.author"]}, "two --label-key"),
    ({"method": "category", "label_keys": ["author"]}, "meta.KEY"),
    ({"method": "category", "label_keys": ["meta.nothing_has_this"]}, "0 distinct"),
    ({"method": "distill"}, "--student"),
    ({"method": "triplet", "student": "tf_efficientnet_lite0"}, "--student"),
])
def test_bad_training_requests_are_refused_with_a_reason(client, sample_index: str, kwargs: dict,  # noqa: ANN001
                                                         reason: str) -> None:
    with pytest.raises(ImgdbError, match=reason):
        client.train_network("refused", sample_index, options=QUICK, **kwargs)
    assert "refused" not in {i.name for i in client.indexes()}


def test_only_a_cnn_index_can_be_fine_tuned(client, museum_sample: Path) -> None:  # noqa: ANN001
    client.create_index("colours", "color")
    client.ingest([museum_sample / "images" / "bbdd_00001.jpg"], index="colours")
    with pytest.raises(ImgdbError, match="no network to fine-tune"):
        client.train_network("refused", "colours", options=QUICK)


def test_train_from_the_cli_prints_a_json_summary(client, sample_index: str, imgdb_home: Path) -> None:  # noqa: ANN001
    imgdb = str(Path(sys.executable).with_name("imgdb"))
    out = subprocess.run([imgdb, "train", "cli_tuned", "--from", sample_index,
                          "--epochs", "1", "--views", "1", "--train-stages", "1", "--json"],
                         capture_output=True, text=True, env={**os.environ, "IMGDB_HOME": str(imgdb_home)})
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["index"] == "cli_tuned" and summary["method"] == "triplet" and summary["seconds"] > 0
    assert "training: epoch 1/1, loss" in out.stderr


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"views": 2.5}, {"lr": float("nan")}, {"time_budget": -1.0},
                                 {"batch": 10**9}, {"margin": float("inf")}])
def test_training_options_are_checked(bad: dict) -> None:
    with pytest.raises(ImgdbError, match="must be"):
        TrainOptions(**bad)


def test_a_killed_training_leaves_nothing_a_rerun_trips_on(client, sample_index: str) -> None:  # noqa: ANN001
    """`imgdb train` killed (SIGKILL) while it fills its new index: the index it leaves is marked
    unfinished, and the next training of that name replaces it."""
    import signal
    import time

    from imgdb.db import indexes, state
    from imgdb.jobs.train import UNFINISHED
    from tests.conftest import tool_env

    process = subprocess.Popen(["imgdb", "train", "train_killed", "--from", sample_index, "--epochs", "1", "--views", "1",
                                "--train-stages", "1"], env=tool_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while "train_killed" not in {i.name for i in client.indexes()}:  # (created: it is filling it now)
            assert process.poll() is None and time.monotonic() < deadline, "the training ended before filling"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    with client.database.connect() as conn:
        left = indexes.get(conn, "train_killed")
        assert left is not None and state.load(conn, left, UNFINISHED)
    report = client.train_network("train_killed", sample_index, options=TrainOptions(**QUICK_TRAINING))
    assert report.encoded.added == SAMPLE_SIZE
    with client.database.connect() as conn:
        assert not state.load(conn, indexes.require(conn, "train_killed"), UNFINISHED)
    client.drop_index("train_killed")
