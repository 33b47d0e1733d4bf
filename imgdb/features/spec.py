"""The extractor spec grammar: ``FAMILY[:ARG][/OPTION]...`` where an option is ``WORD`` or ``KEY=VALUE``.

Examples: ``color:hsv/bins=8x12x3``, ``cnn:tf_efficientnet_lite2/gem/p=3/size=260``. An option
whose value is a file path (``weights=``) comes last and takes the rest of the spec, slashes and
all: ``cnn:resnet50/gem/weights=/models/r50.pth``. A spec names
an extractor *and its exact configuration*; indexes store the canonical (fully expanded) form so that
changing a default later never changes how an existing index encodes its queries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from imgdb.errors import ExtractorSpecError

_FAMILY = re.compile(r"^[a-z][a-z0-9_-]*$")
#: Options whose value is a path: they must come last and run to the end of the spec.
PATH_OPTIONS = ("weights",)


@dataclass(frozen=True)
class Spec:
    """A parsed spec. ``words`` are bare options (e.g. a pooling name), ``options`` the ``k=v`` ones."""

    family: str
    arg: str | None = None
    words: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        head = self.family + (f":{self.arg}" if self.arg else "")
        parts = [*self.words, *(f"{k}={v}" for k, v in self.options.items())]
        return "/".join([head, *parts])


def parse_spec(text: str) -> Spec:
    """Parse a spec string, rejecting anything ambiguous with a one-line reason."""
    text = text.strip()
    if not text:
        raise ExtractorSpecError("empty extractor spec")
    path_option: tuple[str, str] | None = None
    for key in PATH_OPTIONS:
        marker = f"/{key}="
        if marker in text:
            text, _, value = text.partition(marker)
            if not value:
                raise ExtractorSpecError(f"empty {key}= in spec")
            path_option = (key, value)
    head, *parts = text.split("/")
    family, _, arg = head.partition(":")
    family = family.lower()
    if not _FAMILY.match(family):
        raise ExtractorSpecError(f"bad extractor family {family!r} in spec {text!r}")
    words: list[str] = []
    options: dict[str, str] = {}
    for part in parts:
        if not part:
            raise ExtractorSpecError(f"empty option in spec {text!r}")
        key, eq, value = part.partition("=")
        if not eq:
            words.append(part.lower())
        elif not key or not value:
            raise ExtractorSpecError(f"bad option {part!r} in spec {text!r}")
        elif key in options:
            raise ExtractorSpecError(f"option {key!r} given twice in spec {text!r}")
        else:
            options[key.lower()] = value
    if path_option:
        options[path_option[0]] = path_option[1]
    return Spec(family=family, arg=arg or None, words=tuple(words), options=options)


def take_int(options: dict[str, str], key: str, default: int, *, minimum: int = 1) -> int:
    """Pop an integer option (a helper for extractors' spec parsing)."""
    raw = options.pop(key, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ExtractorSpecError(f"option {key}={raw!r} is not an integer") from None
    if value < minimum:
        raise ExtractorSpecError(f"option {key}={value} must be at least {minimum}")
    return value


def take_float(options: dict[str, str], key: str, default: float) -> float:
    """Pop a positive float option."""
    raw = options.pop(key, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ExtractorSpecError(f"option {key}={raw!r} is not a number") from None
    if not value > 0:
        raise ExtractorSpecError(f"option {key}={value} must be positive")
    return value


def take_word(words: list[str], word: str) -> bool:
    """Pop a bare flag option (e.g. ``whiten``); whether it was given."""
    if word in words:
        words.remove(word)
        return True
    return False


def reject_leftovers(spec: Spec, options: dict[str, str], words: list[str]) -> None:
    """Refuse options an extractor did not consume, so that typos never pass silently."""
    extra = [*words, *options]
    if extra:
        raise ExtractorSpecError(f"unknown option(s) {', '.join(extra)} for extractor {spec.family!r}")
