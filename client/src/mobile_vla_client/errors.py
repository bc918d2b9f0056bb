"""What a call can raise: the server's refusal (`ApiError`) or no answer within the call's deadline (`NoAnswer`)."""

from __future__ import annotations

from typing import Any


class ClientError(RuntimeError):
    """Base of the client's errors: `status` (None when no answer came) and `code` a robot can branch on."""

    def __init__(self, text: str, status: int | None, code: str):
        super().__init__(text)
        self.status, self.code = status, code


class ApiError(ClientError):
    """The server answered with an error status (4xx, or a 5xx that stayed after the retries).

    `code` and `message` come from the server's error body (`{"error": {"code", "message"}}`, docs/http_api.md);
    a body in another shape (Ray Serve's own 429/503 text, a proxy's HTML page) gives code `http_error`
    and its first 200 characters as the message. `retry_after_s` is the server's Retry-After, if any.
    """

    def __init__(
        self,
        method: str,
        path: str,
        status: int,
        code: str,
        message: str,
        body: Any = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{method} {path}: HTTP {status} {code}: {message}", status, code)
        self.method, self.path, self.message = method, path, message
        self.body, self.retry_after_s = body, retry_after_s


class NoAnswer(ClientError):
    """No answer within the call's deadline: the server was unreachable or slow, after every retry that fitted."""

    def __init__(self, method: str, path: str, reason: str):
        super().__init__(f"{method} {path}: no answer within the call's deadline ({reason})", None, "no_answer")
        self.method, self.path, self.reason = method, path, reason
