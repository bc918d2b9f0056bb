"""Frame resizing: how a camera frame of any size becomes the 224x224 square every dataset stores.

Resize rules (recorded in a dataset's manifest and in the preprocessing saved with each model, so
training and serving cannot disagree):
- "letterbox" (default): scale the longer side to `size` keeping the aspect ratio (PIL bilinear, which
  low-pass filters when shrinking), centre it and fill the bars with `LETTERBOX_FILL`, the CLIP mean
  colour, which the model's mean/std normalisation maps to ~0. 16:9 frames keep their full field of view.
- "center_crop": scale the shorter side to `size` and cut the centre square (more pixels on the
  centre, loses the sides of wide frames).
Frames already `size` x `size` pass through unchanged under both rules.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mobile_vla.errors import ConfigError, DataError

RESIZE_RULES = ("letterbox", "center_crop")
LETTERBOX_FILL = (123, 117, 104)  # round(255 * CLIP mean), the colour normalisation maps to ~0


def resize_frame(
    image: Any, size: int = 224, resize_rule: str = "letterbox", pad_color: tuple[int, int, int] | None = None
) -> np.ndarray:
    """PIL image or uint8 array [H, W, 3] of any size -> uint8 [size, size, 3] by `resize_rule`.

    Raises:
        ConfigError: an unknown rule.
        DataError: not a uint8 RGB image.
    """
    if resize_rule not in RESIZE_RULES:
        raise ConfigError(f"resize_rule = {resize_rule!r}: expected one of {RESIZE_RULES}")
    pad_color = pad_color or LETTERBOX_FILL
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shown = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"image: {shown}: expected uint8 RGB [H, W, 3]")
    height, width = image.shape[:2]
    if height < 1 or width < 1:
        raise DataError(f"image: shape {list(image.shape)}: empty image")
    if (height, width) == (size, size):
        return np.ascontiguousarray(image)
    scale = size / (max(height, width) if resize_rule == "letterbox" else min(height, width))
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    if resize_rule == "letterbox":
        canvas = Image.new("RGB", (size, size), tuple(pad_color))
        canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    else:  # center_crop
        left, top = (new_w - size) // 2, (new_h - size) // 2
        canvas = resized.crop((left, top, left + size, top + size))
    return np.asarray(canvas, dtype=np.uint8)
