"""The error schema `{"error": {"code", "message"}}` and the handlers that make every failure use it.

Every client mistake becomes a 4xx with a code a robot can branch on; only our own faults may be
5xx, and even then the body keeps the schema and the replica keeps running.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """A request refused with an HTTP status and an error code; becomes the error schema."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers  # e.g. Retry-After on a 429


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header (whole seconds, at least 1: HTTP's delay-seconds is an integer)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def overloaded(message: str, retry_after_s: float) -> ApiError:
    """429 `overloaded` with Retry-After: the request was shed, not computed; send a later step."""
    return ApiError(429, "overloaded", message, headers=retry_after(retry_after_s))


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """A JSON answer in the error schema."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def describe_errors(errors: list[dict]) -> tuple[int, str, str]:
    """Pydantic errors -> (status, code, message): bad JSON is 400, bad fields 422."""
    if any(err.get("type") == "json_invalid" for err in errors):
        return 400, "invalid_json", "request body is not valid JSON"
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "extra_forbidden":
            parts.append(f"{loc}: unknown field")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    return 422, "invalid_request", "; ".join(parts)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
    504: "deadline_exceeded",
}


def install_error_handlers(app: FastAPI) -> None:
    """Makes every failure on `app` answer in the error schema (500 only for our own faults)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        status, code, message = describe_errors(exc.errors())
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal", "internal error (logged on the server)")
