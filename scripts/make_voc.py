"""Write a VOC-layout folder of synthetic scenes, unlike losscc's built-in ones.

    python3 scripts/make_voc.py OUT [--train 96] [--val 48] [--holdout 24] [--size 64] [--noise 28] [--seed 0]

The scenes are "microscopy"-like: a smooth, vignetted background with speckle noise, and
three foreground classes drawn on it — ellipses (cells), long curved bands (fibres) and
small triangles (debris) — each with its own colour and texture, overlapping, some touching
the image border. A one-pixel band around every object is labelled 255 (ignored), as VOC
does. Layout:

    OUT/JPEGImages/NAME.jpg
    OUT/SegmentationClass/NAME.png        palette PNG, pixel value = class index, 255 ignored
    OUT/ImageSets/Segmentation/{train,val,holdout}.txt

Deterministic for a seed; needs numpy and Pillow only.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["background", "cell", "fibre", "debris"]
COLOURS = np.array([[40, 44, 52], [200, 120, 170], [90, 200, 210], [230, 210, 90]], dtype=np.float32)


def scene(rng, size, noise=28.0):
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    label = np.zeros((size, size), dtype=np.uint8)
    # Fibres first (they lie under cells), then cells, then debris on top.
    for _ in range(rng.integers(1, 3)):
        x0, y0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        bend = rng.uniform(-0.03, 0.03)
        width = rng.uniform(1.5, 3.5)
        u = (xs - x0) * np.cos(angle) + (ys - y0) * np.sin(angle)
        v = -(xs - x0) * np.sin(angle) + (ys - y0) * np.cos(angle)
        label[np.abs(v - bend * u * u) < width] = 2
    for _ in range(rng.integers(2, 6)):
        cx, cy = rng.uniform(-0.1, 1.1, 2) * size
        a, b = rng.uniform(0.06, 0.18, 2) * size
        angle = rng.uniform(0, np.pi)
        u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
        v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
        label[(u / a) ** 2 + (v / b) ** 2 <= 1.0] = 1
    for _ in range(rng.integers(1, 5)):
        centre = rng.uniform(0, size, 2)
        corners = centre + rng.uniform(-0.12, 0.12, (3, 2)) * size
        inside = np.ones((size, size), dtype=bool)
        for i in range(3):
            (x1, y1), (x2, y2) = corners[i], corners[(i + 1) % 3]
            side = (x2 - x1) * (ys - y1) - (y2 - y1) * (xs - x1)
            orientation = (x2 - x1) * (corners[(i + 2) % 3][1] - y1) - (y2 - y1) * (corners[(i + 2) % 3][0] - x1)
            inside &= side * orientation >= 0
        label[inside] = 3
    # The image: a colour per class with class-specific texture, a vignette and noise.
    image = COLOURS[label].copy()
    texture = np.sin(xs * rng.uniform(0.3, 0.9)) * np.cos(ys * rng.uniform(0.3, 0.9))
    image += (label[..., None] == 1) * 25.0 * texture[..., None]
    image += (label[..., None] == 2) * 20.0 * np.sin(xs * 1.7 + ys * 0.4)[..., None]
    vignette = 1.0 - 0.35 * (((xs - size / 2) ** 2 + (ys - size / 2) ** 2) / (size / 2) ** 2)
    image *= vignette[..., None]
    image += rng.normal(0.0, noise, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    # A one-pixel ignored band outside every object, as in VOC.
    band = np.zeros_like(label, dtype=bool)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        shifted = np.roll(np.roll(label, dy, 0), dx, 1)
        band |= (shifted != label) & (label == 0)
    label = np.where(band, 255, label).astype(np.uint8)
    return image, label


def palette_png(label, path):
    picture = Image.fromarray(label).convert("P")
    picture.putdata(label.flatten().tolist())
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 251) + [224, 224, 192]
    picture.putpalette(palette)
    picture.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--val", type=int, default=48)
    parser.add_argument("--holdout", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=28.0,
                        help="standard deviation of the pixel noise (0-255 scale); larger is harder")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    splits = {"train": args.train, "val": args.val, "holdout": args.holdout}
    for split, count in splits.items():
        names = []
        for index in range(count):
            name = f"{split}_{index:04d}"
            image, label = scene(rng, args.size, args.noise)
            Image.fromarray(image).save(args.out / "JPEGImages" / f"{name}.jpg", quality=92)
            palette_png(label, args.out / "SegmentationClass" / f"{name}.png")
            names.append(name)
        (args.out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    print(f"wrote {sum(splits.values())} scenes ({', '.join(CLASSES)}) to {args.out}")


if __name__ == "__main__":
    main()
