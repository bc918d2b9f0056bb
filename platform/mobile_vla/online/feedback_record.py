"""One /v1/feedback step, checked and split into JSON meta and its frame, normalised to 224x224.

    meta, image = normalise_record(record)     # DataError naming the field when something is wrong
    frame = decode_frame(image)                # uint8 [224, 224, 3]: the one decode rule (assembly too)

The HTTP layer checks the same fields; this check also guards every other caller of the store.
Frames are stored at 224x224 (letterbox, the platform's default resize rule, in the format sent:
JPEG re-encoded at quality 95, PNG lossless), so a 4096x4096 upload costs the log ~20 KB, not MBs, and
assembly never upscales. A frame already 224x224 (simulated robots) is stored byte for byte as sent.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from mobile_vla.data.frames import resize_frame
from mobile_vla.errors import DataError

ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
IMAGE_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}
ACTION_DIM = 3  # (vx, vy, wz), as the robot executed or the operator corrected it
FLOAT32_MAX = float(np.finfo(np.float32).max)  # larger values become inf in the float32 episode files
FRAME_SIZE = 224  # stored frames are FRAME_SIZE x FRAME_SIZE
FRAME_RESIZE_RULE = "letterbox"  # the platform's default rule (policy.preprocessing); square frames pass through
MAX_FRAME_PIXELS = 4096 * 4096  # a frame claiming more is refused before it is decoded (the API's default)
JPEG_QUALITY = 95


def _check_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or value[0] in "._-" or len(value) > 128 or set(value) - ID_CHARS:
        raise DataError(f"feedback record: {name} = {value!r}: expected letters, digits, '.', '_', '-' (max 128)")
    return value


def _check_vector(name: str, value: Any, length: int | None = None) -> list[float]:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        want = f"{length} numbers" if length is not None else "a list of numbers"
        raise DataError(f"feedback record: {name} = {value!r}: expected {want}")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise DataError(f"feedback record: {name} = {value!r}: every value must be a finite number")
        if abs(item) > FLOAT32_MAX:
            raise DataError(f"feedback record: {name} = {value!r}: {item!r} is beyond the float32 range")
        out.append(float(item))
    return out


def _image_bytes(image: Any) -> bytes:
    """The image as bytes: given as bytes, or as base64 text (the API body)."""
    if isinstance(image, str):
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise DataError("feedback record: image: not valid base64") from None
    if not isinstance(image, (bytes, bytearray, memoryview)) or not image:
        raise DataError(f"feedback record: image: {type(image).__name__}: expected JPEG/PNG bytes or base64 text")
    return bytes(image)


def image_format(data: bytes) -> str:
    """'jpeg' or 'png' from the leading magic bytes.

    Raises:
        DataError: the bytes are neither JPEG nor PNG.
    """
    for magic, name in IMAGE_MAGIC.items():
        if data.startswith(magic):
            return name
    raise DataError(f"feedback record: image: {data[:8]!r}...: expected JPEG or PNG bytes")


class FrameBudgetError(DataError):
    """A frame over the pixel budget: refused before decoding (assembly quarantines its episode)."""


def _open_image(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"feedback record: image: cannot be decoded ({exc})") from None


def decode_frame(data: bytes, max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [224, 224, 3] by the letterbox rule, within a pixel budget (JPEGs are
    decoded at a reduced scale when they are larger, `Image.draft`).

    Raises:
        FrameBudgetError: more than `max_pixels` pixels (checked before decoding).
        DataError: not decodable.
    """
    with _open_image(data) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise FrameBudgetError(f"feedback record: image: {width}x{height} is over the {max_pixels}-pixel budget")
        try:
            if image.format == "JPEG":
                image.draft("RGB", (FRAME_SIZE, FRAME_SIZE))
            image.load()
            rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"feedback record: image: cannot be decoded ({exc})") from None
    return resize_frame(rgb, FRAME_SIZE, FRAME_RESIZE_RULE)  # [224, 224, 3]


def normalise_frame(data: bytes, max_pixels: int = MAX_FRAME_PIXELS) -> tuple[bytes, dict]:
    """The frame as stored: 224x224 in the format sent (a 224x224 frame unchanged), plus its meta
    (`image_format`, `image_source_size` [W, H] as sent).

    Raises:
        DataError: not a JPEG/PNG, undecodable, or over `max_pixels`.
    """
    fmt = image_format(data)
    with _open_image(data) as image:
        width, height = image.size
    meta = {"image_format": fmt, "image_source_size": [width, height]}
    if (width, height) == (FRAME_SIZE, FRAME_SIZE):
        return data, meta
    frame = decode_frame(data, max_pixels)  # [224, 224, 3]
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format=fmt.upper(), **({"quality": JPEG_QUALITY} if fmt == "jpeg" else {}))
    return buffer.getvalue(), meta


def normalise_record(record: Mapping[str, Any]) -> tuple[dict, bytes]:
    """Checks one step and splits it into JSON meta and the raw image bytes.

    Args:
        record: the step as a mapping (or a pydantic model): robot_id, episode_id, step, instruction,
            image (bytes or base64 text), state, action_executed, and the optional action_corrected,
            intervention, episode_done, success, received_at.

    Returns:
        (meta, image): meta with defaults filled in and `image_format`, `image_source_size` added;
        the image normalised to 224x224 (`normalise_frame`).

    Raises:
        DataError: a field is missing or malformed (the message names it).
    """
    if hasattr(record, "model_dump"):
        record = record.model_dump()
    meta = {k: v for k, v in record.items() if k != "image"}
    image = _image_bytes(record.get("image"))
    meta["image_format"] = image_format(image)
    _check_id("robot_id", meta.get("robot_id"))
    _check_id("episode_id", meta.get("episode_id"))
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DataError(f"feedback record: step = {step!r}: expected an integer >= 0")
    instruction = meta.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip() or "\x00" in instruction:
        raise DataError(f"feedback record: instruction = {instruction!r}: expected non-empty text without NUL")
    meta["state"] = _check_vector("state", meta.get("state", []))
    meta["action_executed"] = _check_vector("action_executed", meta.get("action_executed"), ACTION_DIM)
    if meta.get("action_corrected") is not None:
        meta["action_corrected"] = _check_vector("action_corrected", meta["action_corrected"], ACTION_DIM)
    for flag in ("intervention", "episode_done"):
        if not isinstance(meta.setdefault(flag, False), bool):
            raise DataError(f"feedback record: {flag} = {meta[flag]!r}: expected true or false")
    if meta.setdefault("success", None) is not None and not isinstance(meta["success"], bool):
        raise DataError(f"feedback record: success = {meta['success']!r}: expected true, false or null")
    meta.setdefault("received_at", time.time())
    image, frame_meta = normalise_frame(image)
    meta.update(frame_meta)
    return meta, image
