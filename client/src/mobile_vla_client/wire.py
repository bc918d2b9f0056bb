"""The wire format: frames to JPEG bytes, request fields to an HTTP body, and back.

Today's format is JSON with the frame as base64 text (docs/http_api.md, HTTP API v1). Every body the
client sends goes through `JsonWire.encode` and every answer through `JsonWire.decode`, so a second
format (the frame's JPEG bytes as they are, with the other fields beside them) is one more class with
these two methods, chosen per client, and nothing else in the client changes.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Union

import numpy as np
from PIL import Image

# A camera frame: uint8 [H, W, 3] RGB array, a PIL image, or an already encoded JPEG/PNG (e.g. the `data`
# of a ROS sensor_msgs/CompressedImage), sent as it is.
Frame = Union[np.ndarray, Image.Image, bytes, bytearray, memoryview]
JSON_CONTENT_TYPE = "application/json"


def encode_jpeg(frame: Frame, quality: int = 85) -> bytes:
    """A frame -> JPEG bytes; bytes that are already JPEG or PNG go through untouched."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return bytes(frame)
    if isinstance(frame, Image.Image):
        image = frame
    else:
        pixels = np.asarray(frame)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"frame: expected a uint8 [H, W, 3] RGB array, got {pixels.dtype} {list(pixels.shape)}")
        image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_base64(frame: Frame, quality: int = 85) -> str:
    """A frame -> base64 JPEG text: the `image` field of a JSON body."""
    return base64.b64encode(encode_jpeg(frame, quality)).decode("ascii")


class JsonWire:
    """HTTP API v1 bodies: JSON, the frame as base64 text in `image`."""

    name = "json"

    @staticmethod
    def encode(fields: dict[str, Any], image: bytes | None) -> tuple[bytes, dict[str, str]]:
        """(body, headers) of a request: `fields` as they go on the wire, `image` the encoded frame (or None)."""
        body = dict(fields)
        if image is not None:
            body["image"] = base64.b64encode(image).decode("ascii")
        return json.dumps(body, allow_nan=False).encode(), {"Content-Type": JSON_CONTENT_TYPE}

    @staticmethod
    def decode(content: bytes) -> Any:
        """An answer's body -> its fields (raises ValueError on a body that is not JSON)."""
        return json.loads(content)
