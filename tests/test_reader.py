"""Safe decoding: every supported format, EXIF facts and orientation, and each kind of bad input
refused with a one-line reason."""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgdb.errors import ImageReadError
from imgdb.io.reader import decode, read_file
from tests.images import encoded, png_bomb

LIMIT = 100_000_000


@pytest.fixture(scope="module")
def photo(museum: Path) -> bytes:
    return (museum / "images" / "bbdd_00001.jpg").read_bytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"])
def test_supported_formats_decode_to_rgb(photo: bytes, fmt: str) -> None:
    original = decode(photo, max_pixels=LIMIT).pixels
    image = decode(encoded(original, fmt), max_pixels=LIMIT)
    assert image.pixels.mode == "RGB"
    assert image.pixels.size == original.size == (image.facts.width, image.facts.height)
    assert image.facts.format == fmt
    # Lossless formats round-trip exactly; the lossy ones stay close.
    difference = np.abs(np.asarray(image.pixels, dtype=int) - np.asarray(original, dtype=int)).mean()
    assert difference < (40 if fmt == "GIF" else 8)


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixels = np.asarray(decode(data, max_pixels=LIMIT).pixels)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


def test_exif_orientation_camera_and_capture_time() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS 5D"
    exif.get_ifd(0x8769)[0x9003] = "2021:05:06 07:08:09"
    landscape = Image.new("RGB", (40, 20), (200, 10, 10))
    image = decode(encoded(landscape, "JPEG", exif=exif), max_pixels=LIMIT)
    assert image.pixels.size == (20, 40)
    assert (image.facts.width, image.facts.height) == (20, 40)
    assert image.facts.camera == "Canon EOS 5D"
    assert image.facts.taken_at is not None and image.facts.taken_at.isoformat() == "2021-05-06T07:08:09"


def test_draft_decoding_respects_the_scale_hint(photo: bytes) -> None:
    full = decode(photo, max_pixels=LIMIT)
    small = decode(photo, max_pixels=LIMIT, scale_hint=lambda w, h: 0.1)
    assert small.pixels.size[0] < full.pixels.size[0]
    assert small.facts == full.facts  # facts describe the file, not the reduced decode


def test_without_jpeg_drafts_a_jpeg_is_decoded_whole_then_averaged(photo: bytes) -> None:
    """``IMGDB_JPEG_DRAFT=0``: no DCT scaling; the whole image, box-averaged to twice the target."""
    from imgdb.config import Settings
    from imgdb.io.reader import DecodeLimits

    hint = lambda w, h: 0.1  # noqa: E731
    exact = decode(photo, limits=DecodeLimits(max_pixels=LIMIT, jpeg_draft=False), scale_hint=hint)
    drafted = decode(photo, limits=DecodeLimits(max_pixels=LIMIT), scale_hint=hint)
    whole = Image.open(BytesIO(photo)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(exact.pixels), np.asarray(whole.reduce(5)))
    assert not np.array_equal(np.asarray(drafted.pixels), np.asarray(exact.pixels))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IMGDB_JPEG_DRAFT", "0")
        assert Settings.from_env().decoding.jpeg_draft is False


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("zero-byte", lambda photo: b"", "empty file"),
        ("text named .jpg", lambda photo: b"this is not a picture\n" * 20, "not an image"),
        ("truncated JPEG", lambda photo: photo[: len(photo) // 2], "truncated"),
        ("corrupt JPEG", lambda photo: photo[:2000] + bytes(range(256)) * 80, "corrupt"),
        ("header only", lambda photo: photo[:300], "unreadable image header"),
    ],
)
def test_bad_input_is_refused_with_a_reason(photo: bytes, name: str, make, reason: str) -> None:  # noqa: ANN001
    with pytest.raises(ImageReadError, match=reason) as caught:
        decode(make(photo), max_pixels=LIMIT)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("size", "shown"), [(20000, "400000000 pixels"), (12000, "12000x12000 image")])
def test_decompression_bomb_is_refused_before_decoding(size: int, shown: str) -> None:
    # 20000² trips Pillow's own guard while opening; 12000² passes it and meets imgdb's limit.
    bomb = png_bomb(size, size)
    assert len(bomb) < 1_000_000
    started = time.perf_counter()
    with pytest.raises(ImageReadError, match=f"refused as a decompression bomb: .*{shown}"):
        decode(bomb, max_pixels=LIMIT)
    assert time.perf_counter() - started < 1.0  # the header alone decided: nothing was decoded


def test_read_file_refuses_folders_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_file(tmp_path)
    with pytest.raises(ImageReadError, match="No such file"):
        read_file(tmp_path / "missing.jpg")


def _wide_copies(grey: np.ndarray) -> dict[str, bytes]:
    """One 8-bit grey picture in every mode wider than 8 bits that Pillow decodes, as files."""
    return {"16-bit PNG": encoded(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
            "16-bit TIFF": encoded(Image.fromarray(grey.astype(np.uint16) * 257), "TIFF"),
            "12-bit in 16-bit PNG": encoded(Image.fromarray(grey.astype(np.uint16) * 16), "PNG"),
            "32-bit integer TIFF": encoded(Image.fromarray(grey.astype(np.int32) * 2**23), "TIFF"),
            "float TIFF in [0, 1]": encoded(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"),
            "float TIFF in [0, 255]": encoded(Image.fromarray(grey.astype(np.float32)), "TIFF")}


def test_wide_samples_decode_by_their_range(photo: bytes) -> None:
    grey = np.asarray(decode(photo, max_pixels=LIMIT).pixels.convert("L"))
    for name, data in _wide_copies(grey).items():
        pixels = np.asarray(decode(data, max_pixels=LIMIT).pixels, dtype=int)
        assert np.abs(pixels - grey[:, :, None]).max() <= 1, name


def test_a_photo_in_every_depth_finds_its_8_bit_twin_first(client, museum: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """Ingested and queried in 16 and 32 bits, integer or float, a photo is its 8-bit grey twin."""
    gallery = sorted((museum / "images").glob("*.jpg"))[40:48]
    for path in gallery:
        Image.open(path).convert("L").save(tmp_path / f"{path.stem}.png")
    grey = np.asarray(Image.open(gallery[0]).convert("L"))
    copies = _wide_copies(grey)
    (tmp_path / "wide.png").write_bytes(copies["16-bit PNG"])
    client.create_index("depths", "cnn:tf_efficientnet_lite0/gem")
    report = client.ingest([tmp_path], index="depths")
    assert not report.failed
    for name, data in copies.items():
        hits = client.search(data, k=3, index="depths")
        assert {Path(h.uri).name for h in hits[:2]} == {f"{gallery[0].stem}.png", "wide.png"}, name
        assert hits[1].distance < 0.1 < hits[2].distance, name
    client.drop_index("depths")
