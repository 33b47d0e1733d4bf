"""Extractors by family name: built-ins plus any a package registers under the entry-point group
``imgdb.extractors`` (``family = "module:Class"``), so a new descriptor is one new module and no edit
to ingest, search or the CLI."""

from __future__ import annotations

from functools import lru_cache

from imgdb import plugins
from imgdb.errors import ExtractorSpecError
from imgdb.features.base import Extractor
from imgdb.features.spec import Spec, parse_spec

#: Built-in families, imported only when used (the CNN module pulls in torch).
BUILTIN: dict[str, str] = {
    "color": "imgdb.features.color:ColorHistogram",
    "hog": "imgdb.features.hog:HogExtractor",
    "phash": "imgdb.features.phash:PerceptualHash",
    "cnn": "imgdb.features.cnn:CnnExtractor",
    "bow": "imgdb.features.codebook:CodebookExtractor",
    "vlad": "imgdb.features.codebook:CodebookExtractor",
    "fisher": "imgdb.features.codebook:CodebookExtractor",
    "mop": "imgdb.features.mop:MopExtractor",
    "external": "imgdb.features.external:ExternalVectors",
}

#: What an index gets when created without ``--extractor``.
DEFAULT_SPEC = "cnn:tf_efficientnet_lite2/gem"


def families() -> dict[str, str]:
    """Every known family mapped to its ``module:Class``."""
    return plugins.named("imgdb.extractors", BUILTIN)


def extractor_class(family: str) -> type[Extractor]:
    target = families().get(family)
    if target is None:
        raise ExtractorSpecError(f"unknown extractor family {family!r} (known: {', '.join(sorted(families()))})")
    return plugins.load(target)


def canonical_spec(text: str) -> str:
    """The fully expanded form of a spec (validates it without building a model)."""
    spec = parse_spec(text)
    return extractor_class(spec.family).canonical(spec)


@lru_cache(maxsize=8)
def create_extractor(text: str) -> Extractor:
    """The extractor for a spec, built once per process (models are loaded once, then shared)."""
    spec: Spec = parse_spec(canonical_spec(text))
    return extractor_class(spec.family).from_spec(spec)


def list_extractors() -> list[tuple[str, str, str]]:
    """``(family, default spec, description)`` for every variant of every family."""
    classes = dict.fromkeys(extractor_class(family) for family in families())  # one class may serve several
    return [row for cls in classes for row in cls.variants()]
