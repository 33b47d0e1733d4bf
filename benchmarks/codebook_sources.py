"""What a learned descriptor owes to what it learned from: one spec's codebook learned from several
sources, the same gallery searched with each.

    python benchmarks/codebook_sources.py [SPEC]      (default: cnnvlad:tf_efficientnet_lite2)

An index learns its codebook (and PCA) from a sample of its first load, or from the images
``imgdb index train NAME PATHS`` is given. Sources, each into its own index of the museum gallery:

- the gallery itself (287 paintings: what ``benchmarks/features.py`` measures);
- 21 of the gallery (a small first load of the same collection);
- the 60 museum query photos (the same museum on the wall; the museum column then learned from its
  own queries, so only the copies column is fair there);
- scikit-image's 21 bundled sample images (photos, textures, microscopy, text: another collection
  altogether, installed with the test dependencies).

Figures: mAP and recall@1 of the museum queries, mAP of the held-out copy set of :mod:`copies`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import copies  # noqa: E402
from common import museum_or_exit, private_imgdb  # noqa: E402

#: Images of another collection to learn from.
OTHERS = 21


def skimage_samples(root: Path) -> list[Path]:
    """scikit-image's bundled 8-bit sample images of at least 128 px (those it does not download)."""
    import skimage.data

    paths = []
    for name in sorted(n for n in dir(skimage.data) if not n.startswith("_")):
        make = getattr(skimage.data, name)
        try:
            image = make() if callable(make) else None
        except Exception:  # noqa: BLE001 - a sample it would download, or one that needs arguments
            continue
        if (isinstance(image, np.ndarray) and image.dtype == np.uint8 and min(image.shape[:2]) >= 128
                and (image.ndim == 2 or image.shape[2] in (3, 4))):
            paths.append(root / f"{name}.png")
            Image.fromarray(image).convert("RGB").save(paths[-1])
    return paths[:OTHERS]


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "cnnvlad:tf_efficientnet_lite2"
    museum = museum_or_exit()
    gallery = sorted((museum / "images").glob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="imgdb-sources-") as held, private_imgdb() as db:
        copy_set = copies.build(Path(held) / "copies")
        (Path(held) / "others").mkdir()
        sources = {"the gallery": gallery, "21 of the gallery": gallery[::14][:21],
                   "the 60 query photos (museum column: learned from its own queries)":
                       sorted((museum / "queries").glob("*.jpg")),
                   "scikit-image's samples (another collection)": skimage_samples(Path(held) / "others")}
        print(f"`{spec}`, codebook learned from:\n\n| source | images | museum mAP | museum recall@1 | copies mAP (held out) |\n"
              "| --- | --- | --- | --- | --- |")
        for n, (source, paths) in enumerate(sources.items()):
            name = f"s{n}"
            db.create_index(name, spec, ann="none")
            db.train(name, paths)
            db.ingest(gallery, index=name)
            found, held_out = db.evaluate(museum, index=name), db.evaluate(copy_set, index=name)
            print(f"| {source} | {len(paths)} | {found.mAP:.3f} | {found.recall_at_1:.3f} | {held_out.mAP:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
