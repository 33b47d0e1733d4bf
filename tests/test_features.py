"""Extractor specs, pooling maths and the colour histogram, on hand-made inputs and real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features.base import l2_normalize
from imgdb.features.pooling import average, gem, mac
from imgdb.features.registry import DEFAULT_SPEC, canonical_spec, create_extractor, list_extractors
from imgdb.features.spec import parse_spec

#: A global CNN descriptor (the default before cnnvlad).
GEM = "cnn:tf_efficientnet_lite2/gem"


def test_spec_grammar_round_trips() -> None:
    spec = parse_spec("cnn:resnet50/gem/p=3.5/size=300")
    assert (spec.family, spec.arg, spec.words, spec.options) == ("cnn", "resnet50", ("gem",), {"p": "3.5", "size": "300"})
    assert str(spec) == "cnn:resnet50/gem/p=3.5/size=300"


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("color", "color:hsv/bins=8x12x3/size=256"),
        ("color:hsv/bins=4x4x4", "color:hsv/bins=4x4x4/size=256"),
        (DEFAULT_SPEC, "cnnvlad:tf_efficientnet_lite2@blocks.4/k=32/ldim=60/size=384"),
        (GEM, "cnn:tf_efficientnet_lite2/gem/p=3/size=260/whiten=auto"),
        ("cnn:tf_efficientnet_lite2/max/size=300", "cnn:tf_efficientnet_lite2/max/size=300/whiten=auto"),
    ],
)
def test_specs_are_stored_fully_expanded(given: str, canonical: str) -> None:
    assert canonical_spec(given) == canonical


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty"),
        ("sift", "unknown extractor family"),
        ("color:lab", "not supported"),
        ("color:hsv/bins=8x8", "HxSxV"),
        ("color:hsv/typo=1", "unknown option"),
        ("cnn:tf_efficientnet_lite2/gem/max", "more than one pooling"),
        ("cnn:tf_efficientnet_lite2/gem/p=abc", "not a number"),
        ("cnn:tf_efficientnet_lite2/size=10", "at least 32"),
        ("cnn:tf_efficientnet_lite2//gem", "empty option"),
    ],
)
def test_bad_specs_are_refused(bad: str, reason: str) -> None:
    with pytest.raises(ExtractorSpecError, match=reason):
        canonical_spec(bad)


def test_every_listed_variant_has_a_valid_default_spec() -> None:
    rows = list_extractors()
    assert {family for family, _, _ in rows} >= {"color", "cnn-gem", "cnn-max", "cnn-avg"}
    for _, spec, description in rows:
        assert canonical_spec(spec) and description


def test_pooling_by_hand() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # one image, one channel, 2x2
    assert mac(x).item() == 4.0
    assert average(x).item() == 2.5
    assert gem(x, p=1).item() == pytest.approx(2.5)
    assert gem(x, p=3).item() == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3))
    assert gem(x, p=50).item() == pytest.approx(4.0, rel=0.03)  # p -> inf tends to max
    assert gem(torch.full((1, 1, 2, 2), -1.0)).item() == pytest.approx(1e-6)  # clamped, no NaN


def test_l2_normalize_sends_empty_rows_beyond_every_unit_vector() -> None:
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out[0], [0.6, 0.8])
    np.testing.assert_allclose(out[1], out[2])  # images with nothing to describe find each other
    rng = np.random.default_rng(0)
    units = l2_normalize(rng.normal(size=(1000, 2)))
    assert np.linalg.norm(units - out[1], axis=1).min() >= 3 - 1e-6


def test_colour_histogram_on_real_images(museum: Path) -> None:
    extractor = create_extractor("color:hsv")
    images = [Image.open(museum / "images" / f"bbdd_{i:05d}.jpg").convert("RGB") for i in (0, 1)]
    vectors = extractor.embed([extractor.prepare(im) for im in images])
    assert vectors.shape == (2, 288)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    assert (vectors >= 0).all()
    # A solid colour lands in exactly one bin.
    red = extractor.embed([extractor.prepare(Image.new("RGB", (32, 32), (255, 0, 0)))])[0]
    assert np.count_nonzero(red) == 1


def test_cnn_descriptor_keeps_aspect_and_is_unit_length(museum: Path) -> None:
    extractor = create_extractor(GEM)
    image = Image.open(museum / "images" / "bbdd_00004.jpg").convert("RGB")
    prepared = extractor.prepare(image)
    assert len(prepared) == 1  # one scale
    assert min(prepared[0].shape[1:]) == 260
    ratio = image.size[0] / image.size[1]
    assert prepared[0].shape[2] / prepared[0].shape[1] == pytest.approx(ratio, rel=0.02)
    vector = extractor.embed([prepared])[0]
    assert vector.shape == (extractor.dim,) == (1280,)
    assert np.linalg.norm(vector) == pytest.approx(1, rel=1e-5)
    # Same-shaped images batch together and give the same answers as one by one.
    flipped = extractor.prepare(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    together = extractor.embed([prepared, flipped])
    np.testing.assert_allclose(together[0], vector, atol=1e-5)


@pytest.mark.parametrize(("name", "build", "dim"), [
    ("resnet18", "timm", 512),          # a timm name
    ("mobilenet_v2", "torchvision", 1280),  # only in torchvision: its trunk is cut before pooling
])
def test_other_backbones_with_a_local_weights_file(tmp_path: Path, name: str, build: str, dim: int) -> None:
    import timm
    import torchvision

    model = timm.create_model(name, pretrained=False) if build == "timm" else torchvision.models.get_model(name)
    weights = tmp_path / f"{name} weights.pth"
    torch.save(model.state_dict(), weights)
    spec = f"cnn:{name}/gem/weights={weights}"
    assert canonical_spec(spec) == f"cnn:{name}/gem/p=3/size=260/whiten=auto/weights={weights}"
    extractor = create_extractor(spec)
    vector = extractor.embed([extractor.prepare(Image.new("RGB", (300, 200), (10, 200, 30)))])
    assert vector.shape == (1, dim) == (1, extractor.dim)
    assert np.isfinite(vector).all()


def test_hog_bins_gradients_by_orientation_and_normalises_blocks() -> None:
    extractor = create_extractor("hog")
    assert extractor.spec == "hog:gray/size=128/cell=32/bins=9" and extractor.dim == 3 * 3 * 4 * 9
    stripes = np.zeros((128, 128, 3), dtype=np.uint8)
    stripes[:, ::16] = 255  # vertical lines: horizontal gradients (0°)
    vertical = extractor.prepare(Image.fromarray(stripes)).reshape(-1, 4, 9)
    horizontal = extractor.prepare(Image.fromarray(stripes.transpose(1, 0, 2).copy())).reshape(-1, 4, 9)
    assert vertical[..., [0, 8]].sum() > 0.9 * vertical.sum()
    assert horizontal[..., 4].sum() > 0.9 * horizontal.sum()
    # L2-Hys: every block renormalised to unit length after clipping at 0.2.
    np.testing.assert_allclose(np.linalg.norm(vertical.reshape(-1, 36), axis=1), 1, rtol=0.01)


def test_phash_distance_is_hamming_distance(museum: Path) -> None:
    extractor = create_extractor("phash")
    assert extractor.spec == "phash:dct/bits=8" and extractor.dim == 64
    photo = Image.open(museum / "images" / "bbdd_00009.jpg").convert("RGB")
    hashes = extractor.embed([extractor.prepare(im) for im in (photo, photo.resize((200, 150)), photo.rotate(90, expand=True))])
    np.testing.assert_allclose(np.linalg.norm(hashes, axis=1), 1, rtol=1e-6)
    bits = hashes > 0
    for i, j in ((0, 1), (0, 2)):
        hamming = np.count_nonzero(bits[i] != bits[j])
        assert np.linalg.norm(hashes[i] - hashes[j]) == pytest.approx(2 * np.sqrt(hamming / 64), rel=1e-5)
    # Robust to rescaling, not to rotation.
    assert np.count_nonzero(bits[0] != bits[1]) <= 6 < np.count_nonzero(bits[0] != bits[2])
