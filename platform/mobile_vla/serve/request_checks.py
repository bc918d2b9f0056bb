"""Reading and checking HTTP request bodies before any model work: each failure is an ApiError (4xx).

Bodies are read by hand (not by FastAPI's body parameter) so the size limit holds before a byte is
parsed and the content type is checked first; the pydantic models in `schemas` still validate the
fields and document the API. Images are refused by their header (format, pixel count) before their
pixels are decoded.

`/v1/act` takes two wire forms (docs/http_api.md): JSON with the frame as base64 text, and the binary
form v1: the frame's JPEG (or PNG) bytes as the body (`Content-Type: image/jpeg` or `image/png`), the
other fields as one JSON object in the `X-Act-Fields` header, checked by the same model (`ActFields`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError

from mobile_vla.errors import MobileVLAError
from mobile_vla.serve.auth import TokenGrant, TokenVerifier
from mobile_vla.serve.errors_http import ApiError, describe_errors
from mobile_vla.serve.schemas import ActFields, ActRequest

# Decoded pixels (after DCT scaling) up to which an image decodes on the event loop: the API's 224 x 224 frame,
# or a VGA camera frame decoded at half scale, costs about a millisecond, as much as the hop to a worker thread;
# measured (benchmarks/serve_load.py, HAProxy, 64 robots), a thread hop per request spread the arrivals at the
# ingress batcher so its batches shrank from ~11 to ~4 robots and throughput fell ~25%. Larger decodes go to a
# thread so that one robot's big frame does not stall the others.
DECODE_INLINE_PIXELS = 320 * 240
MAX_JPEG_SCANS = 32  # a progressive JPEG has ~10 scans; thousands make a small file cost seconds to decode
SOS_MARKER = b"\xff\xda"  # JPEG start of scan: 0xFF in entropy-coded data is always followed by 0x00 or RST
JSON_TYPE = "application/json"
FRAME_TYPES = {"image/jpeg": ("JPEG",), "image/png": ("PNG",)}  # binary form: body media type -> PIL format
ANY_FRAME = ("JPEG", "PNG")  # what the JSON form's base64 `image` may hold
FIELDS_HEADER = "X-Act-Fields"  # binary form v1: the step's other fields, one ASCII JSON object
MAX_FIELDS_HEADER_BYTES = 16 * 1024  # a memory token is a few KB; HAProxy's and h11's header buffers are 16 KB


@dataclass(frozen=True)
class ActInput:
    """A `/v1/act` request as read off the wire, either form: its fields and its still-encoded frame."""

    fields: ActFields  # an ActRequest for the JSON form
    image: str | bytes  # base64 text (JSON form) or the frame's bytes as sent (binary form)
    formats: tuple[str, ...]  # the image formats the request may hold (the binary form's content type names one)


def authorize(request: Request, verifier: TokenVerifier) -> TokenGrant:
    """The grant of the request's bearer token; 401 unless it carries a known one."""
    grant = verifier.grant_for(request.headers.get("authorization"))
    if grant is None:
        raise ApiError(401, "unauthorized", "missing or invalid bearer token")
    return grant


def permit(grant: TokenGrant, scope: str, robot_id: str | None = None) -> None:
    """403 unless the token has `scope` and covers `robot_id`."""
    refusal = grant.refusal(scope, robot_id)
    if refusal is not None:
        raise ApiError(403, "forbidden", refusal)


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request, model: type[BaseModel], max_body_bytes: int) -> BaseModel:
    """The body as `model`: 415 for another content type, 413 past the limit, 400/422 for bad JSON/fields."""
    content_type = media_type(request)
    if content_type != JSON_TYPE:
        raise ApiError(
            415, "unsupported_media_type", f"content-type must be application/json, got {content_type or 'none'!r}"
        )
    try:
        return model.model_validate_json(await read_body(request, max_body_bytes))
    except ValidationError as exc:
        status, code, message = describe_errors(exc.errors())
        raise ApiError(status, code, message) from None


async def read_act(request: Request, max_body_bytes: int) -> ActInput:
    """A `/v1/act` request in either wire form. JSON: as `read_json`. Binary (`image/jpeg`, `image/png`): the
    `X-Act-Fields` header is checked before the body is read (400 missing or not JSON, 413 too long, 422 bad
    fields, as in the JSON form), then the body (413 past the limit, 400 empty). 415 for any other type.
    """
    content_type = media_type(request)
    if content_type == JSON_TYPE:
        body: ActRequest = await read_json(request, ActRequest, max_body_bytes)
        return ActInput(body, body.image, ANY_FRAME)
    if content_type not in FRAME_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            "content-type must be application/json, or image/jpeg or image/png (binary form, fields in "
            f"{FIELDS_HEADER}), got {content_type or 'none'!r}",
        )
    fields = act_fields(request.headers.get(FIELDS_HEADER))
    raw = await read_body(request, max_body_bytes)
    if not raw:
        raise ApiError(400, "invalid_image", f"body is empty: the binary form sends the frame's {content_type} bytes")
    return ActInput(fields, raw, FRAME_TYPES[content_type])


def act_fields(header: str | None) -> ActFields:
    """The binary form's `X-Act-Fields` header (one ASCII JSON object) as `ActFields`."""
    if header is None:
        raise ApiError(
            400,
            "missing_fields",
            f"{FIELDS_HEADER} header is missing: the binary form carries "
            "robot_id, instruction, state (and memory, deadline_ms, delay_ms) there as a JSON object",
        )
    if len(header) > MAX_FIELDS_HEADER_BYTES:
        raise ApiError(
            413, "fields_too_large", f"{FIELDS_HEADER} is {len(header)} bytes; at most {MAX_FIELDS_HEADER_BYTES}"
        )
    if not header.isascii():
        raise ApiError(
            400, "invalid_json", f"{FIELDS_HEADER} must be ASCII JSON: write other characters as \\uXXXX escapes"
        )
    try:
        return ActFields.model_validate_json(header)
    except ValidationError as exc:
        status, code, message = describe_errors(exc.errors())
        if code == "invalid_json":
            message = f"{FIELDS_HEADER} is not a valid JSON object"
        raise ApiError(status, code, message) from None


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The whole body; 413 as soon as it (or its declared length) passes `max_body_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(
            413, "body_too_large", f"body of {int(declared)} bytes exceeds the limit of {max_body_bytes} bytes"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, "body_too_large", f"body exceeds the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def decode_image(
    data: str | bytes,
    max_pixels: int,
    prepare_image: Callable[[Image.Image], np.ndarray],
    target_size: int = 224,
    formats: tuple[str, ...] = ANY_FRAME,
) -> np.ndarray:
    """base64 text (JSON form) or the bytes themselves (binary form) of a JPEG/PNG -> uint8 [S, S, 3] by the
    saved preprocessing (`prepare_image`); `formats`: the image formats accepted (400 for another).

    Budgets before any pixel is decoded: the header's pixel count (`max_pixels`, 413) and a JPEG's
    scan count (`MAX_JPEG_SCANS`, 413). A JPEG larger than `target_size` is decoded at a reduced DCT
    scale (`Image.draft`, still >= target_size on both sides). An image that decodes to more than
    `DECODE_INLINE_PIXELS` is decoded in a worker thread, off the event loop; a frame of the API's size
    decodes inline.
    """
    if isinstance(data, str):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_image", "image is not valid base64") from None
    else:
        raw = data
    try:
        image = Image.open(io.BytesIO(raw), formats=formats)
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", f"image is not a {' or '.join(formats)}") from None
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(400, "invalid_image", f"image cannot be decoded: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ApiError(413, "image_too_large", f"image is {width}x{height}; at most {max_pixels} pixels")
    if image.format == "JPEG":
        scans = raw.count(SOS_MARKER)
        if scans > MAX_JPEG_SCANS:
            image.close()
            raise ApiError(413, "image_too_large", f"JPEG has {scans} scans; at most {MAX_JPEG_SCANS}")
        if min(width, height) > target_size:
            image.draft("RGB", (target_size, target_size))  # DCT scaling: 1/2, 1/4 or 1/8 of the pixels decoded

    def decode() -> np.ndarray:
        with image:
            image.load()  # truncated or corrupt data fails here, before any resize
            return prepare_image(image.convert("RGB"))

    decoded_width, decoded_height = image.size  # after DCT scaling
    try:
        inline = decoded_width * decoded_height <= DECODE_INLINE_PIXELS
        return decode() if inline else await asyncio.to_thread(decode)
    except (OSError, SyntaxError, ValueError, MobileVLAError) as exc:
        raise ApiError(400, "invalid_image", f"image cannot be decoded: {exc}") from None


def check_state(state: list[float], state_dim: int) -> np.ndarray:
    """The robot state as float32 [S]; 422 unless it has exactly the model's S values."""
    if len(state) != state_dim:
        raise ApiError(422, "invalid_request", f"state: expected {state_dim} floats, got {len(state)}")
    return np.asarray(state, dtype=np.float32)
