"""SPoC, R-MAC and CroW pooling on hand-made feature maps, checked against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imgdb.errors import ExtractorSpecError
from imgdb.features.pooling import (
    POOLINGS,
    cam,
    crow,
    crow_channel_weights,
    crow_spatial_weights,
    mac,
    rmac,
    rmac_regions,
    spoc,
    spoc_centre_prior,
)
from imgdb.features.registry import canonical_spec

# --------------------------------------------------------------------------------------------------
# SPoC


def test_spoc_centre_prior_on_an_odd_map() -> None:
    prior = spoc_centre_prior(5, 7)
    assert prior.shape == (5, 7)
    sigma = 5 / 6  # a third of the distance (2.5 cells) from the centre to the closest border
    assert prior[2, 3].item() == pytest.approx(1.0)  # the central cell
    assert prior.max().item() == pytest.approx(1.0)
    assert prior[2, 4].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)))  # one cell to the right
    assert prior[1, 3].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)))  # one cell up
    assert prior[0, 0].item() == pytest.approx(math.exp(-(2**2 + 3**2) / (2 * sigma**2)))  # a corner
    # σ recovered from a weight: one cell away, α = exp(-1 / (2σ²))  ⇒  σ = sqrt(-1 / (2 ln α))
    assert math.sqrt(-1 / (2 * math.log(prior[2, 4].item()))) == pytest.approx(sigma, rel=1e-5)
    torch.testing.assert_close(prior, prior.flip(0))
    torch.testing.assert_close(prior, prior.flip(1))


def test_spoc_centre_prior_on_an_even_map() -> None:
    prior = spoc_centre_prior(6, 6)
    sigma = 1.0  # 3 cells to the border, / 3
    # the centre falls between the four central cells, half a cell from each
    for i, j in [(2, 2), (2, 3), (3, 2), (3, 3)]:
        assert prior[i, j].item() == pytest.approx(math.exp(-(0.5**2 + 0.5**2) / (2 * sigma**2)))
    assert prior[0, 0].item() == pytest.approx(math.exp(-(2.5**2 + 2.5**2) / 2))
    assert prior[0, 2].item() == pytest.approx(math.exp(-(2.5**2 + 0.5**2) / 2))
    torch.testing.assert_close(prior, prior.flip(0))
    torch.testing.assert_close(prior, prior.flip(1))
    torch.testing.assert_close(prior, prior.T)
    assert prior.max().item() < 1.0


def test_spoc_centre_prior_sigma_follows_the_shorter_side() -> None:
    wide, tall = spoc_centre_prior(4, 10), spoc_centre_prior(10, 4)
    torch.testing.assert_close(wide, tall.T)
    sigma = 4 / 6
    # cells (1, 4) and (1, 5) are ±0.5 from the centre across and 0.5 down: same weight
    assert wide[1, 4].item() == pytest.approx(math.exp(-0.5 / (2 * sigma**2)))
    assert wide[1, 0].item() == pytest.approx(math.exp(-(0.5**2 + 4.5**2) / (2 * sigma**2)))


def test_spoc_sums_under_the_prior() -> None:
    x = torch.zeros(1, 2, 5, 7)
    x[0, 0] = 1.0
    x[0, 1, 0, 0] = 3.0
    x[0, 1, 2, 3] = -2.0  # negative (SiLU) activations are summed as they are
    out = spoc(x)
    assert out.shape == (1, 2)
    prior = spoc_centre_prior(5, 7)
    assert out[0, 0].item() == pytest.approx(prior.sum().item())
    assert out[0, 1].item() == pytest.approx(3 * prior[0, 0].item() - 2.0)


def test_spoc_without_prior_is_the_plain_sum() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5) - 30
    torch.testing.assert_close(spoc(x, centre_prior=False), x.sum(dim=(-2, -1)))


# --------------------------------------------------------------------------------------------------
# R-MAC


def squares(size: int, ys: list[int], xs: list[int]) -> list[tuple[int, int, int, int]]:
    return [(y, x, size, size) for y in ys for x in xs]


def test_rmac_regions_on_a_square_map() -> None:
    # 10×10: side min(H,W)=10. l=1: one 10-square. l=2: side floor(20/3)=6, 2×2 of them, step
    # (10-6)/1=4. l=3: side floor(20/4)=5, 3×3, step (10-5)/2=2.5 → offsets floor(0, 2.5, 5).
    expected = [
        (0, 0, 10, 10),  # the whole map (reference code)
        *squares(10, [0], [0]),
        *squares(6, [0, 4], [0, 4]),
        *squares(5, [0, 2, 5], [0, 2, 5]),
    ]
    assert rmac_regions(10, 10, 3) == expected


def test_rmac_regions_on_a_wide_map() -> None:
    # 10×20: with n level-1 squares of side 10 along 20 cells the step is 10/(n-1) and they overlap
    # by 1 - step/10: n=2 → 0%, n=3 → 50%, n=4 → 67%...; 50% is closest to 40%, so n=3 (two extra
    # regions along the width at every level).
    expected = [
        (0, 0, 10, 20),
        *squares(10, [0], [0, 5, 10]),  # l=1: 1 × 3, step 5
        *squares(6, [0, 4], [0, 4, 9, 14]),  # l=2: 2 × 4, steps 4 and 14/3 = 4.67
        *squares(5, [0, 2, 5], [0, 3, 7, 11, 15]),  # l=3: 3 × 5, steps 2.5 and 15/4 = 3.75
    ]
    assert rmac_regions(10, 20, 3) == expected
    tall = rmac_regions(20, 10, 3)
    assert sorted(tall) == sorted((x, y, w, h) for y, x, h, w in expected)  # the same grid, transposed


def test_rmac_regions_pick_the_overlap_closest_to_40_percent() -> None:
    # 10×40: step 30/(n-1) = 30, 15, 10, 7.5, 6, 5 → overlap -200%, -50%, 0%, 25%, 40%, 50%: n=6
    level1 = rmac_regions(10, 40, 1)[1:]
    assert level1 == squares(10, [0], [0, 6, 12, 18, 24, 30])
    first, second = level1[0], level1[1]
    assert (first[1] + first[3] - second[1]) / first[3] == pytest.approx(0.4)
    # 10×13: steps 3, 1.5... → overlap 70%, 85%...: two regions, the least overlapping
    assert rmac_regions(10, 13, 1)[1:] == squares(10, [0], [0, 3])


def test_rmac_regions_stay_inside_the_map_and_touch_its_borders() -> None:
    for h, w in [(7, 9), (9, 35), (16, 16), (8, 31), (1, 4), (3, 2)]:
        regions = rmac_regions(h, w, 4)
        for y, x, height, width in regions:
            assert 0 <= y and y + height <= h and 0 <= x and x + width <= w
        for level_side in {r[2] for r in regions[1:]}:
            at_level = [r for r in regions[1:] if r[2] == level_side]
            assert max(y + s for y, _, s, _ in at_level) == h
            assert max(x + s for _, x, _, s in at_level) == w


def test_rmac_regions_skip_regions_smaller_than_a_cell() -> None:
    # 1×1: l=1 has a 1-cell region, l=2 and l=3 would have side floor(2/3) = floor(2/4) = 0
    assert rmac_regions(1, 1, 3) == [(0, 0, 1, 1), (0, 0, 1, 1)]


def toy_map() -> torch.Tensor:
    x = torch.zeros(1, 2, 2, 3)
    x[0, 0] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    x[0, 1] = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    return x


def test_rmac_on_a_toy_map() -> None:
    x = toy_map()
    # 2×3: level-1 squares of side 2, steps 1, 0.5... → overlap 50%, 75%...: two of them (cols 0-1, 1-2)
    assert rmac_regions(2, 3, 1) == [(0, 0, 2, 3), (0, 0, 2, 2), (0, 1, 2, 2)]
    whole = torch.tensor([2.0, 3.0]) / math.sqrt(13)
    left = torch.tensor([1.0, 3.0]) / math.sqrt(10)
    right = torch.tensor([2.0, 3.0]) / math.sqrt(13)
    torch.testing.assert_close(rmac(x, levels=1)[0], whole + left + right, atol=1e-5, rtol=1e-5)
    # l=2 adds the six single cells (side floor(4/3) = 1); normalised: (1,0), (0,1), 0, 0, 0, (1,0)
    assert rmac_regions(2, 3, 2)[3:] == squares(1, [0, 1], [0, 1, 2])
    torch.testing.assert_close(rmac(x, levels=2)[0], whole + left + right + torch.tensor([2.0, 1.0]),
                               atol=1e-5, rtol=1e-5)


def test_rmac_is_per_image_and_normalises_each_region() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 9)
    out = rmac(x)
    torch.testing.assert_close(out[1:2], rmac(x[1:2]))
    regions = rmac_regions(7, 9, 3)
    # every region vector has norm 1, so the sum has norm at most the number of regions
    assert (out.norm(dim=1) <= len(regions) + 1e-4).all()
    # scaling one image's activations does not change its R-MAC
    torch.testing.assert_close(rmac(5 * x), out, atol=1e-5, rtol=1e-5)
    by_hand = sum(mac(x[..., y:y + h, x0:x0 + w]) / mac(x[..., y:y + h, x0:x0 + w]).norm(dim=1, keepdim=True)
                  for y, x0, h, w in regions)
    torch.testing.assert_close(out, by_hand, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# CroW


def crow_map() -> torch.Tensor:
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 0.0], [2.0, 1.0]])  # fires at 3 of 4 positions
    x[0, 1] = torch.tensor([[-1.0, 0.0], [0.0, 4.0]])  # 1 of 4: the -1 (SiLU-like) counts as 0
    # channel 2 stays all zero: never fires
    return x


def test_crow_spatial_weights_by_hand() -> None:
    x = crow_map()
    response = torch.tensor([[1.0, 0.0], [2.0, 5.0]])  # Σ_c max(x, 0)
    norm = math.sqrt(1 + 0 + 4 + 25)  # ‖S'‖_2
    expected = (response / norm).sqrt()  # b = 2
    torch.testing.assert_close(crow_spatial_weights(x)[0], expected)
    torch.testing.assert_close(crow_spatial_weights(x, a=1, b=1)[0], response / 8)


def test_crow_channel_weights_by_hand() -> None:
    beta = crow_channel_weights(crow_map())[0]
    # Ω = (3/4, 1/4, 0), ΣΩ = 1; the empty channel gets 0 instead of log(1/0) = ∞
    torch.testing.assert_close(beta, torch.tensor([math.log(4 / 3), math.log(4.0), 0.0]))


def test_crow_vector_by_hand() -> None:
    x = crow_map()
    s = crow_spatial_weights(x)[0]
    pooled = torch.stack([
        1 * s[0, 0] + 2 * s[1, 0] + 1 * s[1, 1],
        4 * s[1, 1],  # the -1 is clamped away
        torch.tensor(0.0),
    ])
    expected = torch.tensor([math.log(4 / 3), math.log(4.0), 0.0]) * pooled
    out = crow(x)
    assert out.shape == (1, 3)
    torch.testing.assert_close(out[0], expected)
    assert torch.isfinite(out).all()


def test_crow_on_maps_with_nothing_positive_is_zero_not_nan() -> None:
    for x in (torch.zeros(2, 3, 4, 4), -torch.rand(2, 3, 4, 4)):
        assert torch.equal(crow(x), torch.zeros(2, 3))
        assert torch.equal(crow_spatial_weights(x), torch.zeros(2, 4, 4))
        assert torch.equal(crow_channel_weights(x), torch.zeros(2, 3))


def test_crow_weights_each_image_on_its_own() -> None:
    x = torch.cat([crow_map(), torch.rand(1, 3, 2, 2)])
    torch.testing.assert_close(crow(x)[:1], crow(crow_map()))


# --------------------------------------------------------------------------------------------------
# Registry and spec grammar


def test_every_pooling_maps_a_batch_to_one_vector_per_image() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6)
    assert {"gem", "max", "avg", "spoc", "rmac", "crow", "cam"} <= set(POOLINGS)
    classifier = {"weight": torch.randn(10, 8), "bias": torch.randn(10)}
    for name, pooling in POOLINGS.items():
        out = pooling.fn(x, **pooling.params, **(classifier if pooling.classifier else {}))
        assert out.shape == (2, 8), name
        assert torch.isfinite(out).all(), name


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("cnn:tf_efficientnet_lite2/gem", "cnn:tf_efficientnet_lite2/gem/p=3/size=260/whiten=auto"),
        ("cnn:tf_efficientnet_lite2/max", "cnn:tf_efficientnet_lite2/max/size=260/whiten=auto"),
        ("cnn:tf_efficientnet_lite2/avg", "cnn:tf_efficientnet_lite2/avg/size=260/whiten=auto"),
        ("cnn:tf_efficientnet_lite2/spoc", "cnn:tf_efficientnet_lite2/spoc/size=260/whiten=auto"),
        ("cnn:tf_efficientnet_lite2/rmac", "cnn:tf_efficientnet_lite2/rmac/levels=3/size=260/whiten=auto"),
        ("cnn:tf_efficientnet_lite2/rmac/size=300/levels=2", "cnn:tf_efficientnet_lite2/rmac/levels=2/size=300/whiten=auto"),
        ("cnn:tf_efficientnet_lite2/crow", "cnn:tf_efficientnet_lite2/crow/a=2/b=2/size=260/whiten=auto"),
        ("cnn:tf_efficientnet_lite2/crow/b=0.5", "cnn:tf_efficientnet_lite2/crow/a=2/b=0.5/size=260/whiten=auto"),
    ],
)
def test_pooling_options_pass_through_the_spec(given: str, canonical: str) -> None:
    assert canonical_spec(given) == canonical


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("cnn:tf_efficientnet_lite2/gem/levels=3", "unknown option"),
        ("cnn:tf_efficientnet_lite2/max/p=3", "unknown option"),
        ("cnn:tf_efficientnet_lite2/rmac/levels=0", "at least 1"),
        ("cnn:tf_efficientnet_lite2/rmac/levels=2.5", "not an integer"),
        ("cnn:tf_efficientnet_lite2/crow/a=-1", "must be positive"),
        ("cnn:tf_efficientnet_lite2/spoc/rmac", "more than one pooling"),
    ],
)
def test_bad_pooling_options_are_refused(bad: str, reason: str) -> None:
    with pytest.raises(ExtractorSpecError, match=reason):
        canonical_spec(bad)


def test_cam_weights_the_map_by_the_likeliest_classes_activation_maps() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((1, 3, 2, 4)).astype(np.float32))
    weight = torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32))
    bias = torch.from_numpy(rng.normal(size=4).astype(np.float32))
    f, w, b = x[0].numpy(), weight.numpy(), bias.numpy()
    logits = f.mean(axis=(1, 2)) @ w.T + b
    expected = np.zeros(3)
    for c in np.argsort(-logits)[:2]:
        activation = np.einsum("k,khw->hw", w[c], f)
        activation = (activation - activation.min()) / (activation.max() - activation.min())
        v = np.array([(activation * f[k]).sum() for k in range(3)])
        expected += v / np.linalg.norm(v)
    np.testing.assert_allclose(cam(x, weight, bias, classes=2)[0].numpy(), expected, rtol=1e-5)


def test_cam_pools_the_last_map_with_the_backbones_classifier() -> None:
    assert canonical_spec("cnn:tf_efficientnet_lite2/cam") == "cnn:tf_efficientnet_lite2/cam/classes=5/size=260/whiten=auto"
    with pytest.raises(ExtractorSpecError, match="no @blocks.4"):
        canonical_spec("cnn:tf_efficientnet_lite2@blocks.4/cam")


def test_numpy_poolings_pool_as_the_torch_ones() -> None:
    """The shape-dependent poolings the ONNX runtime applies to the map its graph returns, in numpy:
    the same cells, the same sums, on maps of several shapes (square, wide, tall, tiny)."""
    from imgdb.features.pooling_kinds import KINDS
    from imgdb.features.pooling_numpy import NUMPY_POOLINGS

    assert set(NUMPY_POOLINGS) == {name for name, kind in KINDS.items() if kind.shape_dependent}
    rng = np.random.default_rng(0)
    for shape in [(2, 16, 9, 9), (1, 16, 9, 35), (1, 16, 12, 5), (1, 16, 2, 3)]:
        x = rng.normal(size=shape).astype(np.float32)
        for name, fn in NUMPY_POOLINGS.items():
            params = KINDS[name].params
            want = POOLINGS[name].fn(torch.from_numpy(x), **params).numpy()
            np.testing.assert_allclose(fn(x, **params), want, rtol=1e-5, atol=1e-5, err_msg=f"{name} {shape}")
