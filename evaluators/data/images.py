"""Decoding one image file (or encoded bytes) to a uint8 HWC array of the shape a space takes (Pillow).

Shared by the folder and tfds sources. Images are resized to `resolution` x `resolution`
(bilinear, antialiased when shrinking; the aspect ratio is not kept) and converted to the
space's channels (grayscale 'L' or 'RGB'), unless the spec requires the channels as they are.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from search_spaces.errors import NasError

MODES = {1: "L", 3: "RGB"}
# channels of a decoded image by Pillow mode; palette images are colour
MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "P": 3, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
                 "LA": 2, "PA": 2, "RGBA": 4, "RGBa": 4, "CMYK": 4}
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def target_mode(channels: int, where: str) -> str:
    """The Pillow mode for a space with `channels` channels ('L' or 'RGB')."""
    if channels not in MODES:
        raise NasError(f"{where}: the space takes {channels}-channel images; image datasets decode to "
                       f"1 (grayscale) or 3 (RGB) channels (set space_input.in_channels)")
    return MODES[channels]


@dataclass(frozen=True)
class Decoder:
    """Turns one image into uint8 (resolution, resolution, channels); picklable for loader workers."""

    resolution: int
    channels: int
    require: int | None = None  # channels every image must already have (dataset.channels), or None
    skip_corrupt: bool = False

    def __call__(self, source: str | bytes, where: str) -> np.ndarray | None:
        """The decoded image, or None if it is unreadable and `skip_corrupt`; else NasError naming `where`."""
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                img.load()
                return self.convert(img, where)
        except UNREADABLE as e:
            if self.skip_corrupt:
                return None
            raise NasError(f"{where}: unreadable or corrupt image ({type(e).__name__}: {str(e)[:120]}); fix or "
                           f"remove it, or set dataset.skip_corrupt: true") from None

    def convert(self, img: Image.Image, where: str) -> np.ndarray:
        """A decoded Pillow image to the target shape, checking channels against `require`."""
        have = MODE_CHANNELS.get(img.mode, len(img.getbands()))
        if self.require is not None and have != self.require:
            raise NasError(f"{where}: image has {have} channels (mode {img.mode}) but dataset.channels is "
                           f"{self.require}; convert the images or set dataset.channels: null to convert on load")
        mode = target_mode(self.channels, where)
        if img.mode != mode:
            img = img.convert(mode)
        if img.size != (self.resolution, self.resolution):
            img = img.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
        out = np.asarray(img, dtype=np.uint8)
        return out[..., None] if out.ndim == 2 else out

    def from_array(self, a: np.ndarray, where: str) -> np.ndarray:
        """A uint8 HW or HWC array (e.g. a TFDS image) to the target shape."""
        a = np.asarray(a)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        return self.convert(Image.fromarray(a), where)
