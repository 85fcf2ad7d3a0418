"""Build the photo benchmark sets: real photos the student's ImageNet tagger partly recognises.

scikit-image ships a few real photos (a cat, a coffee cup, a rocket launch, a motorcycle, the Hubble
deep field, an astronaut). Each becomes a class of ``--per-class`` augmented views (random resized
crop, flip, rotation, colour jitter, blur), so a stream meets every class many times and the student
alone already knows some of them (the tagger says "tabby", "espresso", "missile", "moped").

Writes, under ``--out``:
- ``photos/<class>/<i>.jpg``: a class-folder dataset (``icd run --dataset <out>/photos``);
- ``photos_mixed.jsonl``: a manifest mixing option questions ("What is shown in this image?" with the
  class names as options) and open questions ("Name the main thing in this photo in one or two
  words.", answered by the class name) on alternating images.

    python benchmarks/make_photos.py --out data/bench --per-class 40 --seed 0   # data/ is git-ignored
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

CLASSES = {
    "cat": "chelsea",
    "coffee cup": "coffee",
    "rocket": "rocket",
    "motorcycle": "stereo_motorcycle",
    "galaxy": "hubble_deep_field",
    "astronaut": "astronaut",
}
OPEN_PROMPT = "Name the main thing in this photo in one or two words."


def source_photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
        arr = arr[0]
    return Image.fromarray(np.asarray(arr)).convert("RGB")


def augment(img: Image.Image, rng: np.random.Generator, size: int = 256) -> Image.Image:
    """One random view: crop 35-100% of the area at aspect 3:4-4:3, flip, rotate +-15 degrees, jitter
    brightness, contrast and saturation by +-30%, sometimes blur; short side ``size``."""
    w, h = img.size
    for _ in range(20):
        area = rng.uniform(0.35, 1.0) * w * h
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = w, h
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = view.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, expand=False)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhancer(view).enhance(float(rng.uniform(0.7, 1.3)))
    if rng.random() < 0.3:
        view = view.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    scale = size / min(view.size)
    return view.resize((max(1, round(view.width * scale)), max(1, round(view.height * scale))))


def build(out: Path, per_class: int, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    folder = out / "photos"
    lines = []
    options = sorted(CLASSES)
    for label in options:
        src = source_photo(CLASSES[label])
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / label / f"{i:03d}.jpg"
            augment(src, rng).save(path, quality=90)
            line = {"image": str(path.relative_to(out)), "label": label}
            if i % 2 == 0:
                line |= {"prompt": "What is shown in this image?", "options": options}
            else:
                line |= {"prompt": OPEN_PROMPT}
            lines.append(line)
    manifest = out / "photos_mixed.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/bench"))
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    folder, manifest = build(args.out, args.per_class, args.seed)
    print(json.dumps({"folder": str(folder), "manifest": str(manifest)}))


if __name__ == "__main__":
    main()
