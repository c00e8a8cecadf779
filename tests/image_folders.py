"""Real image files for dataset tests and benchmarks: scikit-learn's digits rendered as class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits



def digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (1797, size, size, 3) images, labels): the 8x8 digits upscaled (bilinear), each tinted by a
    random colour drawn independently of its class (so colour carries no label information)."""
    d = load_digits()
    tints = np.random.default_rng(0).uniform(0.35, 1.0, (len(d.target), 3))
    out = np.empty((len(d.target), size, size, 3), np.uint8)
    for i, img in enumerate(d.images):
        grey = Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.round(np.asarray(grey, np.float64)[..., None] * tints[i]).astype(np.uint8)
    return out, d.target.astype(np.int64)


def write_digits_folder(root: Path, *, size: int = 32, fmt: str = "png", test_every: int = 5,
                        limit: int | None = None) -> tuple[Path, np.ndarray, np.ndarray]:
    """ROOT/train/DIGIT/NNNN.fmt and ROOT/test/... (every `test_every`-th image); returns (root, images, labels)."""
    x, y = digit_images(size)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    root = Path(root)
    for i, (img, label) in enumerate(zip(x, y)):
        split = "test" if i % test_every == 0 else "train"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.{fmt}", **({"quality": 95} if fmt == "jpg" else {}))
    return root, x, y
