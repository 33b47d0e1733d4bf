"""Safe decoding of untrusted image bytes into RGB pixels plus the facts worth recording.

Every image imgdb sees, ingested or queried, passes through :func:`decode`: only a fixed set of
formats is parsed, the pixel count is checked from the header *before* any pixel is decoded
(decompression bombs), truncated files are refused rather than padded with grey, and the EXIF
orientation is applied so that a photo taken upright is described upright.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import math
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgdb.errors import ImageReadError

#: Formats imgdb decodes; anything else Pillow could parse is refused (smaller attack surface).
#: Multi-picture JPEGs (MPO) come through the JPEG opener.
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
#: File name suffixes picked up when a folder is walked.
SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
#: Files larger than this are not read into memory at all.
MAX_FILE_BYTES = 256 * 1024 * 1024

_EXIF_ORIENTATION = 0x0112
_EXIF_MAKE = 0x010F
_EXIF_MODEL = 0x0110
_EXIF_DATETIME = 0x0132
_EXIF_IFD = 0x8769
_EXIF_DATETIME_ORIGINAL = 0x9003
#: EXIF text kept for information (the camera) is cut to this many characters.
EXIF_TEXT_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

T = TypeVar("T")

# imgdb checks the pixel count itself, against its own limit, before decoding.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# Register every plugin now: `Image.open(formats=...)` only knows the few formats Pillow preloads
# (no WebP, TIFF) until something triggers a full init.
Image.init()


@dataclass(frozen=True)
class ImageFacts:
    """What is recorded about an image besides its descriptor."""

    sha256: str
    width: int
    height: int
    format: str
    file_size: int
    taken_at: dt.datetime | None
    camera: str | None


@dataclass(frozen=True)
class DecodedImage:
    """Upright RGB pixels and the facts about the file they came from."""

    pixels: Image.Image
    facts: ImageFacts


#: Given the upright (width, height), the scale the consumer will resize to; lets JPEG decode at a
#: reduced size (libjpeg's DCT scaling), several times faster for large photos.
ScaleHint = Callable[[int, int], float]
#: JPEGs are decoded to at least this multiple of the consumer's target size: DCT scaling straight to
#: the target loses detail that area averaging keeps (museum recall@1 0.900 against 0.917 at 2x).
DRAFT_MARGIN = 2.0


def read_file(path: Path, *, inside: str | None = None) -> bytes:
    """Read a file's bytes, refusing what is not a regular, reasonably sized file, or, with
    ``inside``, a file that does not lie in that folder.

    The file is opened once and everything is checked on what was opened (its descriptor), never
    on the name again: a symlink swapped in between a check and a read cannot bring another file
    (without blocking on a FIFO, which is refused as not a regular file). Messages do not repeat
    the path: callers report it next to the reason.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageReadError(exc.strerror or str(exc)) from exc
    except ValueError as exc:  # a NUL in the name: no such file can exist
        raise ImageReadError(f"not a valid file name ({exc})") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise ImageReadError("not a regular file")
        if opened.st_size == 0:
            raise ImageReadError("empty file")
        if opened.st_size > MAX_FILE_BYTES:
            raise ImageReadError(f"file of {opened.st_size} bytes is larger than {MAX_FILE_BYTES}")
        if inside is not None:
            _check_inside(path, opened, inside)
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ImageReadError(f"file is larger than {MAX_FILE_BYTES} bytes")
        return data
    except OSError as exc:
        raise ImageReadError(exc.strerror or str(exc)) from exc
    finally:
        os.close(fd)


def _check_inside(path: Path, opened: os.stat_result, folder: str) -> None:
    """Refuse the file opened unless it is the one its real path names now, inside ``folder``: if a
    symlink was swapped after the open, that path names another file (another inode) and the read
    is refused, whichever file the swap put where."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([base, real]) != base:
        raise ImageReadError(f"outside the attached root {folder}")
    try:
        named = os.stat(real)
    except OSError:
        named = None
    if named is None or (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
        raise ImageReadError(f"changed while it was read (a link to outside the attached root {folder}?)")


#: A content hash as imgdb writes it (:func:`sha256_hex`), and how stored networks are named.
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DecodeLimits:
    """How much decoding an image may cost. The pixel count is checked from the header; the memory a
    decode takes (by the mode and bit depth it decodes to, and the format's own buffers) is checked
    against ``max_bytes`` per image, and against ``in_flight`` for all decodes of the process at
    once: a decode waits while others hold that budget. ``jpeg_draft``: a JPEG that will be shrunk
    is decoded by libjpeg at a reduced size (DCT scaling, to twice the target: several times faster
    on camera photos); off, every JPEG is decoded whole, then averaged down like the formats that
    have no reduced-size decoding (``IMGDB_JPEG_DRAFT=0``)."""

    max_pixels: int = 100_000_000
    max_bytes: int = 512 * 2**20
    in_flight: int = 1024 * 2**20
    jpeg_draft: bool = True


#: Bytes per pixel Pillow stores each mode in (8-bit modes of one band in one byte, 16-bit in two,
#: everything else, RGB included, in four).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
#: Formats whose decoder holds a buffer of its own beside Pillow's (libwebp decodes into one).
_DECODER_BUFFER = {"WEBP": 4}


def decoded_bytes(image: Image.Image) -> int:
    """What decoding ``image`` (at its size now: after a JPEG draft) takes at its peak: Pillow's
    image, the decoder's own buffer, the RGB conversion (and the float copy a wide mode is scaled
    through), and a possible EXIF rotation."""
    width, height = image.size
    per_pixel = (_STORED_BYTES.get(image.mode, 4) + _DECODER_BUFFER.get(str(image.format), 0)
                 + (0 if image.mode == "RGB" else 4) + (5 if _wide(image.mode) else 0) + 4)
    return width * height * per_pixel


def _wide(mode: str) -> bool:
    """Whether a mode's samples go past 8 bits (16- and 32-bit integers, floats): Pillow's own RGB
    conversion clips those at 255, which turns a 16-bit photo nearly white."""
    return mode in ("I", "F") or mode.startswith("I;16")


#: Bit depths a wide image's samples are taken to span: the smallest that holds its largest value
#: (a 12-bit sensor's samples in a 16-bit file stay as bright as the sensor made them; 31: a signed
#: 32-bit mode's largest).
_DEPTHS = (8, 10, 12, 14, 16, 24, 31)


def rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. Samples wider than 8 bits are scaled by their real range: floats
    within [0, 1] by 255, anything else by the smallest bit depth that holds its values (offset by
    the least, where some are negative); what is not finite counts as 0."""
    if image.mode == "RGB":
        return image
    if not _wide(image.mode):
        return image.convert("RGB")
    # (In place on one float copy: what decoded_bytes reserves for a wide mode.)
    samples = np.array(image, dtype=np.float32)
    np.nan_to_num(samples, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    low = min(0.0, float(samples.min(initial=0.0)))
    span = float(samples.max(initial=0.0)) - low
    top = 1.0 if image.mode == "F" and span <= 1.0 else \
        float(next((2**bits - 1 for bits in _DEPTHS if span <= 2**bits - 1), span))
    samples -= low
    samples *= 255.0 / top
    samples += 0.5
    np.clip(samples, 0, 255, out=samples)
    return Image.fromarray(samples.astype(np.uint8), "L").convert("RGB")


class _Budget:
    """Bytes the decodes of this process may hold at once."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self.changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: self.free >= nbytes)
            self.free -= nbytes
        try:
            yield
        finally:
            with self.changed:
                self.free += nbytes
                self.changed.notify_all()
            if nbytes >= TRIM_AFTER:
                return_memory()


_budgets: dict[int, _Budget] = {}
_budgets_lock = threading.Lock()
#: A decode at least this large gives freed memory back to the system afterwards: glibc keeps it
#: for reuse otherwise, and a server that decoded one huge upload would stay that size.
TRIM_AFTER = 64 * 2**20


def _budget(total: int) -> _Budget:
    with _budgets_lock:
        return _budgets.setdefault(total, _Budget(total))


def return_memory() -> None:
    """Ask glibc to give memory freed by large decodes back to the system (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


def identify(data: bytes) -> str:
    """The format of an image, from its header alone (no pixel is decoded), or a refusal."""
    try:
        with Image.open(BytesIO(data), formats=FORMATS) as image:
            return "JPEG" if image.format == "MPO" else str(image.format)
    except UnidentifiedImageError:
        raise ImageReadError("not an image in a supported format (JPEG, PNG, WebP, TIFF, BMP, GIF)") from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise ImageReadError(f"unreadable image header: {exc}") from exc


def decode(data: bytes, *, max_pixels: int | None = None, limits: DecodeLimits | None = None,
           scale_hint: ScaleHint | None = None, sha256: str | None = None) -> DecodedImage:
    """Decode ``data`` into an upright RGB image, or raise :class:`ImageReadError` with the reason.
    ``max_pixels`` overrides that of ``limits``."""
    limits = limits or DecodeLimits()
    max_pixels = max_pixels or limits.max_pixels
    if not data:
        raise ImageReadError("empty file")
    try:
        image = Image.open(BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageReadError("not an image in a supported format (JPEG, PNG, WebP, TIFF, BMP, GIF)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own, larger limit tripped while opening
        raise ImageReadError(f"refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise ImageReadError(f"unreadable image header: {exc}") from exc
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageReadError(f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageReadError(
                f"refused as a decompression bomb: {width}x{height} image has more than {max_pixels:,} pixels"
            )
        jpeg = image.format in ("JPEG", "MPO")
        # A JPEG's EXIF is in its header; other formats may have to decode everything to find it
        # (PNG), so theirs is read inside the memory reservation.
        exif = _exif(image) if jpeg else None
        if jpeg and scale_hint is not None and limits.jpeg_draft:
            orientation = exif.get(_EXIF_ORIENTATION, 1)
            upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            scale = min(1.0, DRAFT_MARGIN * scale_hint(*upright))
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        need = decoded_bytes(image)
        if need > limits.max_bytes:
            raise ImageReadError(
                f"refused: decoding this {width}x{height} {image.format} ({image.mode}) would take about "
                f"{need / 2**20:,.0f} MiB, more than the {limits.max_bytes / 2**20:,.0f} MiB a decode may"
                " (IMGDB_DECODE_MAX_BYTES)")
        with _budget(max(limits.in_flight, limits.max_bytes)).reserve(need):
            if exif is None:
                exif = _exif(image)
            orientation = exif.get(_EXIF_ORIENTATION, 1)
            upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            try:
                image.seek(0)  # GIF/TIFF/MPO: the first frame
                image.load()
                pixels = rgb(image)
                pixels = ImageOps.exif_transpose(pixels, in_place=False) if orientation != 1 else pixels.copy()
            except Exception as exc:  # truncated data, bad Huffman tables, zlib errors...
                raise ImageReadError(f"corrupt or truncated image data: {exc}") from exc
            # Formats with no reduced-size decoding (PNG, WebP...) are brought down to what a JPEG
            # draft would give, before the reservation ends: the full-size pixels never outlive it.
            scale = scale_hint(*pixels.size) if scale_hint is not None else 1.0
            factor = int(1 / (DRAFT_MARGIN * scale)) if scale > 0 else 1
            if factor >= 2:
                pixels = pixels.reduce(factor)
        facts = ImageFacts(
            sha256=sha256 or sha256_hex(data),
            width=upright[0],
            height=upright[1],
            format="JPEG" if image.format == "MPO" else str(image.format),
            file_size=len(data),
            taken_at=_informative(_taken_at, exif),
            camera=_informative(_camera, exif),
        )
    return DecodedImage(pixels=pixels, facts=facts)


def _exif(image: Image.Image) -> Image.Exif:
    try:
        return image.getexif()  # for PNG, reading the EXIF chunk loads the whole image
    except Exception as exc:  # a truncated PNG fails here, before load()
        raise ImageReadError(f"corrupt or truncated image data: {exc}") from exc


def _informative(read: Callable[[Image.Exif], T], exif: Image.Exif) -> T | None:
    """An EXIF fact, or None where the file's EXIF is too broken to give it (a bad IFD offset):
    the image itself is still good."""
    try:
        return read(exif)
    except Exception:  # noqa: BLE001 - Pillow raises struct, key, value and type errors here
        return None


def _camera(exif: Image.Exif) -> str | None:
    # EXIF text is whatever the file says: NULs and control characters inside, bytes that are not
    # UTF-8. The camera is only informative, so it is cleaned rather than refused.
    make, model = (_clean(exif.get(tag, "")) for tag in (_EXIF_MAKE, _EXIF_MODEL))
    if model.lower().startswith(make.lower()):
        make = ""  # many cameras repeat the make in the model ("Canon" + "Canon EOS 5D")
    return " ".join(part for part in (make, model) if part) or None


def _clean(value: object) -> str:
    """EXIF text made storable: control characters (NUL among them) dropped, what UTF-8 cannot
    encode replaced, cut to EXIF_TEXT_CHARS."""
    text = _CONTROL.sub("", str(value)).encode("utf-8", "replace").decode("utf-8")
    return text.strip()[:EXIF_TEXT_CHARS]


def _taken_at(exif: Image.Exif) -> dt.datetime | None:
    raw = exif.get_ifd(_EXIF_IFD).get(_EXIF_DATETIME_ORIGINAL) or exif.get(_EXIF_DATETIME)
    if not raw:
        return None
    try:
        return dt.datetime.strptime(str(raw).strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None  # cameras write all sorts of placeholders ("0000:00:00 00:00:00")
