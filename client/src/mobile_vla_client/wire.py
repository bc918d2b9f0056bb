"""The wire format: frames to JPEG bytes, request fields to an HTTP body, and back.

Two formats (docs/http_api.md, HTTP API v1), chosen per client (`Client(..., wire="json" | "binary")`):
`JsonWire`, JSON with the frame as base64 text, and `BinaryWire`, the binary form v1 of `/v1/act`: the
frame's bytes as they are for the body (`image/jpeg` or `image/png`) and the other fields as one ASCII
JSON object in the `X-Act-Fields` header. Every body the client sends goes through a wire's `encode`
and every answer (JSON either way) through its `decode`; a path the binary form does not cover
(`/v1/feedback`) goes as JSON (`takes`).
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
FIELDS_HEADER = "X-Act-Fields"  # binary form v1: the step's fields besides the frame
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    def takes(path: str) -> bool:
        """Whether `path` has a body in this format (JSON: every path)."""
        return True

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


class BinaryWire(JsonWire):
    """The binary form v1 of `/v1/act`: the frame's bytes as the body, no base64; answers are JSON."""

    name = "binary"
    paths = ("/v1/act",)

    @classmethod
    def takes(cls, path: str) -> bool:
        """Whether `path` has a binary form (only `/v1/act`; the client sends the others as JSON)."""
        return path in cls.paths

    @staticmethod
    def encode(fields: dict[str, Any], image: bytes | None) -> tuple[bytes, dict[str, str]]:
        """(frame bytes, headers): the content type from the bytes' signature (PNG, else JPEG), the fields as
        ASCII JSON (`ensure_ascii`: other characters as JSON escapes) in `X-Act-Fields`.
        """
        if image is None:
            raise ValueError("the binary form carries a frame: image is None")
        content_type = "image/png" if image[:8] == PNG_SIGNATURE else "image/jpeg"
        header = json.dumps(fields, allow_nan=False, ensure_ascii=True, separators=(",", ":"))
        return image, {"Content-Type": content_type, FIELDS_HEADER: header}


WIRES = {wire.name: wire for wire in (JsonWire, BinaryWire)}


def wire_named(name: str) -> type[JsonWire]:
    """The wire format called `name` ("json" or "binary"); a clear error for another."""
    try:
        return WIRES[name]
    except KeyError:
        raise ValueError(f"wire must be one of {sorted(WIRES)}, got {name!r}") from None
