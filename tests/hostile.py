"""A corpus of hostile inputs, made by code (no binary blobs in the repository): text that
PostgreSQL's ``text`` and ``jsonb`` cannot hold, in every place that reaches the database."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: Strings PostgreSQL cannot store as text: a NUL; a lone surrogate (what an undecodable file
#: name becomes in Python), which has no UTF-8 form.
UNSTORABLE_TEXT = {"nul": "Can\x00on", "surrogate": "caf\udce9"}


def jpeg_with_exif(seed: int, **tags: str) -> bytes:
    """A small real JPEG whose EXIF carries ``tags`` (by name: make, model, datetime)."""
    codes = {"make": 0x010F, "model": 0x0110, "datetime": 0x0132}
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    for name, value in tags.items():
        exif[codes[name]] = value
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def nested_json(depth: int) -> str:
    """JSON text of objects nested ``depth`` deep (written out: json.dumps would recurse)."""
    return '{"down": ' * depth + '"bottom"' + "}" * depth


#: Metadata JSON (and jsonb) cannot hold, as the JSON text a file or request would carry, each
#: with the words its refusal must contain.
UNSTORABLE_METADATA = {
    "nan": ('{"score": NaN}', "not a finite number"),
    "infinity": ('{"score": Infinity}', "not a finite number"),
    "nul value": ('{"title": "a\\u0000b"}', "NUL"),
    "nul key": ('{"ti\\u0000tle": "x"}', "NUL"),
    "surrogate": ('{"title": "caf\\udce9"}', "not valid Unicode"),
    "deep": (nested_json(2000), "nested deeper than"),
}


def lying_webp(width: int = 10_000, height: int = 10_000) -> bytes:
    """A few KB of lossless WebP that decodes to ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


def png16(width: int, height: int) -> bytes:
    """A small 16-bit greyscale PNG of ``width`` x ``height`` (flat: it compresses to little)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width), dtype=np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


#: Every format imgdb decodes, with Pillow's name for it and its file suffix.
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif"}


def image_file(fmt: str, width: int = 200, height: int = 200, seed: int = 0) -> bytes:
    """A real image of ``width`` x ``height`` in ``fmt``, noisy enough not to compress to nothing."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def corpus(fmt: str) -> dict[str, tuple[bytes, str | None]]:
    """Broken files of ``fmt``, each with a pattern its refusal must match (None: any reason): cut
    short, a header that lies about the size (larger than the data), garbage after the format's
    magic bytes."""
    good = image_file(fmt, seed=1)
    lying = bytearray(good)
    if fmt == "BMP":    # BITMAPINFOHEADER width, height (little-endian int32 at 18 and 22)
        lying[18:26] = (4000).to_bytes(4, "little") + (3000).to_bytes(4, "little")
    elif fmt == "GIF":  # the logical screen: 65535 x 65535 (a frame smaller than it is legal)
        lying[6:10] = (65535).to_bytes(2, "little") * 2
    elif fmt == "PNG":  # IHDR width, height (its CRC then lies too)
        lying[16:24] = (4000).to_bytes(4, "big") + (3000).to_bytes(4, "big")
    else:               # JPEG SOF0, WebP VP8 frame, TIFF tags: cut the data under a true header
        lying = lying[: len(lying) * 2 // 3]
    magic = {"JPEG": b"\xff\xd8\xff\xe0", "PNG": b"\x89PNG\r\n\x1a\n", "WEBP": b"RIFF\x00\x01\x00\x00WEBPVP8 ",
             "TIFF": b"II*\x00", "BMP": b"BM", "GIF": b"GIF89a"}[fmt]
    garbage = magic + np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes()
    return {"truncated": (good[: len(good) // 2], "truncated|header"), "lying": (bytes(lying), None),
            "garbage": (garbage, None)}
