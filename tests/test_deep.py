"""Deep-feature options on real photos: multi-scale extraction, intermediate stages, learned
PCA-whitening, and MOP's three levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features.base import l2_normalize
from imgdb.features.cnnvlad import CnnVladExtractor
from imgdb.features.mop import MopExtractor
from imgdb.features.registry import create_extractor, extractor_class
from imgdb.features.spec import parse_spec
from imgdb.features.whitening import learn_projection, project


@pytest.fixture(scope="module")
def photos(museum: Path) -> list[Image.Image]:
    return [Image.open(museum / "images" / f"bbdd_{i:05d}.jpg").convert("RGB") for i in range(2, 8)]


def fresh(spec: str):  # noqa: ANN201 - a new (untrained) instance, not the shared cached one
    parsed = parse_spec(spec)
    return extractor_class(parsed.family).from_spec(parsed)


def test_multi_scale_decodes_once_and_sums_normalised_scales(photos: list[Image.Image]) -> None:
    extractor = create_extractor("cnn:tf_efficientnet_lite2/gem/scales=1,0.707,0.5")
    prepared = extractor.prepare(photos[0])
    assert [min(a.shape[1:]) for a in prepared] == [260, 184, 130]
    per_scale = [l2_normalize(extractor._single_scale([a])) for a in prepared]
    np.testing.assert_allclose(extractor.embed([prepared])[0], l2_normalize(sum(per_scale))[0], atol=1e-6)


def test_intermediate_stage(photos: list[Image.Image]) -> None:
    extractor = create_extractor("cnn:tf_efficientnet_lite2@blocks.4/gem")
    assert extractor.dim == 120  # channels of that stage
    assert extractor.embed([extractor.prepare(photos[0])]).shape == (1, 120)
    with pytest.raises(ExtractorSpecError, match="no stage 'layer3'; its stages: blocks.0"):
        create_extractor("cnn:tf_efficientnet_lite2@layer3/gem")


def test_whitening_decorrelates_the_sample() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))  # correlated
    state = learn_projection(x, 6, whiten=True)
    np.testing.assert_allclose(np.cov(project(x, state, 6).T), np.eye(6), atol=1e-3)
    small = learn_projection(x[:4], 6, whiten=False)  # 4 samples: 3 components, zero-padded
    assert project(x[:4], small, 6).shape == (4, 6) and not project(x, small, 6)[:, 3:].any()


def test_whitening_auto_needs_enough_images_and_on_learns_it(photos: list[Image.Image]) -> None:
    auto = fresh("cnn:tf_efficientnet_lite2/gem")
    assert auto.trainable and auto.sample_size(1000) == 0 and auto.sample_size(5000) == 1000
    auto.fit([])
    assert auto.trained and "pca_components" not in auto.state()
    forced = fresh("cnn:tf_efficientnet_lite2/gem/whiten=on")
    prepared = [forced.prepare(p) for p in photos]
    forced.fit(prepared)
    assert forced.state()["pca_components"].shape == (len(photos) - 1, 1280)
    vectors = forced.embed(prepared)
    assert vectors.shape == (len(photos), 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    assert not fresh("cnn:tf_efficientnet_lite2/gem/whiten=off").trainable


def test_mop_levels(photos: list[Image.Image]) -> None:
    extractor = fresh("mop:tf_efficientnet_lite2/k=2/ldim=4/size=160")  # small: few patches, a quick test
    assert isinstance(extractor, MopExtractor)
    assert extractor.dim == 1280 + 2 * 2 * 4  # short enough: no reduction
    prepared = [extractor.prepare(p) for p in photos[:4]]
    height, width = prepared[0].shape[1:]
    assert min(height, width) == 160
    whole, levels = extractor._levels(prepared)
    expected = [((height - side) // stride + 1) * ((width - side) // stride + 1) for side, stride in ((128, 32), (64, 16))]
    assert [len(level[0]) for level in levels] == expected
    assert levels[1][0].shape[1] == 1280
    extractor.fit(prepared)
    raw = extractor._raw(whole, levels)
    blocks = np.split(raw, [1280, 1280 + 8], axis=1)
    for block in blocks:  # each level L2-normalised before concatenation
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1, rtol=1e-5)
    assert extractor.embed(prepared).shape == (4, extractor.dim)


def test_cnn_vlad_pools_an_intermediate_maps_positions_over_words_learned_from_the_collection(
        photos: list[Image.Image]) -> None:
    extractor = fresh("cnnvlad:tf_efficientnet_lite2/k=4/ldim=8/size=192")
    assert isinstance(extractor, CnnVladExtractor)
    assert extractor.spec == "cnnvlad:tf_efficientnet_lite2@blocks.4/k=4/ldim=8/size=192" and extractor.dim == 32
    prepared = [extractor.prepare(p) for p in photos]
    height, width = prepared[0].shape[1:]
    assert min(height, width) == 192
    [positions] = extractor._positions(prepared[:1])  # (one per cell of the stride-16 map, unit length)
    assert positions.shape == (-(-height // 16) * -(-width // 16), 120)
    np.testing.assert_allclose(np.linalg.norm(positions, axis=1), 1, rtol=1e-5)
    with pytest.raises(RuntimeError, match="not trained"):
        extractor.describe(prepared)
    extractor.fit(prepared)
    assert extractor.state()["centres"].shape == (4, 8)
    smaller = photos[0].resize((photos[0].width * 4 // 5, photos[0].height * 4 // 5))
    vectors = extractor.embed([extractor.prepare(smaller), *prepared])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    assert np.linalg.norm(vectors[1:] - vectors[0], axis=1).argmin() == 0
    reloaded = fresh(extractor.spec)
    reloaded.load_state(extractor.state())
    np.testing.assert_allclose(reloaded.embed(prepared), vectors[1:], atol=1e-6)


@pytest.mark.parametrize(("spec", "reason"), [
    ("cnnvlad:tf_efficientnet_lite2/ldim=200", "ldim=200 is more than the 120 channels"),
    ("cnnvlad:tf_efficientnet_lite2/dim=full/whiten", "whiten needs a reduction"),
    ("cnnvlad:tf_efficientnet_lite2/k=64/ldim=64/dim=5000", "dim=5000 is more than the 4096"),
    ("cnnvlad:tf_efficientnet_lite2@layer3", "no stage 'layer3'"),
    ("cnnvlad:tf_efficientnet_lite2/size=10", "size"),
])
def test_cnn_vlad_refuses_what_cannot_work(spec: str, reason: str) -> None:
    with pytest.raises(ExtractorSpecError, match=reason):
        fresh(spec)


def test_cnn_vlad_is_kept_whole_unless_dim_asks_for_a_reduction() -> None:
    default = fresh("cnnvlad:tf_efficientnet_lite2")
    assert (default.dim, default.spec) == (1920, "cnnvlad:tf_efficientnet_lite2@blocks.4/k=32/ldim=60/size=384")
    assert fresh("cnnvlad:tf_efficientnet_lite2/k=64/dim=512").dim == 512  # 3,840 dimensions: PCA to 512
    for spec in ("cnnvlad:tf_efficientnet_lite2/k=64", "cnnvlad:tf_efficientnet_lite2/k=64/dim=full"):
        whole = fresh(spec)  # (longer than HNSW indexes: spelled dim=full, as before it was the default)
        assert (whole.dim, whole.spec) == (3840, "cnnvlad:tf_efficientnet_lite2@blocks.4/k=64/ldim=60/size=384/dim=full")


@pytest.mark.parametrize("spec", ["cnn:tf_efficientnet_lite2/" + p for p in ("gem", "max", "avg", "spoc", "rmac", "crow")]
                         + ["hog", "color:hsv", "phash"])
def test_each_global_descriptor_recognises_a_rescaled_photo(photos: list[Image.Image], spec: str) -> None:
    """On real paintings: the same painting at 80% size is nearer than the other paintings."""
    extractor = create_extractor(spec)
    smaller = photos[0].resize((photos[0].width * 4 // 5, photos[0].height * 4 // 5))
    vectors = extractor.embed([extractor.prepare(p) for p in [smaller, *photos]])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    distances = np.linalg.norm(vectors[1:] - vectors[0], axis=1)
    assert distances.argmin() == 0, distances
