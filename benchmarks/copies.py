"""A held-out copy-detection set: hard edited copies of museum paintings, to search the gallery with.

    python benchmarks/copies.py DIR        (benchmarks/features.py builds it in a temporary folder)

No descriptor, default or setting of imgdb was chosen on it, so it measures what a choice does on
pictures it was not tuned on. 120 gallery paintings (seeded) each give one query, an edit harder
than those the calibration makes (:mod:`imgdb.training.edits`): a crop of 35–60% of the area at a
random place, a turn of up to 25° with a coloured fill, the painting shrunk onto a larger noisy ground,
a perspective warp of up to 18% per corner, or contrast, saturation and blur changed; every copy is
saved at a JPEG quality of 30 to 80. The folder has the data-set layout of CONVENTIONS.md:
``images`` (a link to the museum gallery), ``queries/``, ``queries.json``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import museum_or_exit  # noqa: E402

COPIES = 120
SEED = 7


def _crop(image: Image.Image, rng: random.Random, gallery: list[Path]) -> Image.Image:
    share = rng.uniform(0.35, 0.6) ** 0.5
    width, height = int(image.width * share), int(image.height * share)
    left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    return image.crop((left, top, left + width, top + height))


def _turn(image: Image.Image, rng: random.Random, gallery: list[Path]) -> Image.Image:
    return image.rotate(rng.uniform(-25, 25), expand=True, fillcolor=(rng.randint(0, 255),) * 3)


def _inset(image: Image.Image, rng: random.Random, gallery: list[Path]) -> Image.Image:
    shape = (int(image.height * 1.6), int(image.width * 1.6), 3)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, shape)
    ground = Image.fromarray(np.clip(noise + [rng.randint(0, 255) for _ in range(3)], 0, 255).astype(np.uint8))
    share = rng.uniform(0.6, 0.9)
    small = image.resize((int(image.width * share), int(image.height * share)))
    ground.paste(small, (rng.randint(0, ground.width - small.width), rng.randint(0, ground.height - small.height)))
    return ground


def _perspective(image: Image.Image, rng: random.Random, gallery: list[Path]) -> Image.Image:
    width, height = image.size
    inward = [(rng.uniform(0, 0.18), rng.uniform(0, 0.18)) for _ in range(4)]
    corners = [(x * width, y * height) for x, y in ((0, 0), (1, 0), (1, 1), (0, 1))]
    sources = [(abs(cx - dx * width), abs(cy - dy * height)) for (cx, cy), (dx, dy) in zip(corners, inward)]
    rows, values = [], []
    for (x, y), (u, v) in zip(corners, sources):  # (the homography taking the output's corners to the source's)
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        values += [u, v]
    coefficients = np.linalg.solve(np.array(rows), np.array(values))
    return image.transform(image.size, Image.Transform.PERSPECTIVE, tuple(coefficients), Image.Resampling.BICUBIC)


def _colour(image: Image.Image, rng: random.Random, gallery: list[Path]) -> Image.Image:
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.5, 1.5))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.2, 1.8))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2)))


EDITS: dict[str, Callable[[Image.Image, random.Random, list[Path]], Image.Image]] = {
    "crop": _crop, "turn": _turn, "inset": _inset, "perspective": _perspective, "colour": _colour}


def build(root: Path, seed: int = SEED) -> Path:
    """The copy set in ``root`` (made once; returned as it is when already there); another ``seed``
    draws other paintings, edits and qualities: a set that nothing was chosen on, however often
    the first was looked at."""
    if (root / "queries.json").is_file():
        return root
    gallery = sorted((museum_or_exit() / "images").glob("*.jpg"))
    (root / "queries").mkdir(parents=True, exist_ok=True)
    if not (root / "images").exists():
        (root / "images").symlink_to(gallery[0].parent)
    rng = random.Random(seed)
    queries = []
    for n, path in enumerate(rng.sample(gallery, COPIES)):
        kind = list(EDITS)[n % len(EDITS)]
        name = f"queries/copy_{n:03d}_{kind}.jpg"
        EDITS[kind](Image.open(path).convert("RGB"), rng, gallery).save(root / name, "JPEG", quality=rng.randint(30, 80))
        queries.append({"query": name, "relevant": [f"images/{path.name}"], "junk": []})
    (root / "queries.json").write_text(json.dumps(queries, indent=1))
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    print(build(Path(sys.argv[1])))
