"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status."""

from __future__ import annotations

import math

from ..errors import TinyGPTVError


class APIError(TinyGPTVError):
    """An error the server answers with `status` and OpenAI's error body."""

    status = 400
    type = "invalid_request_error"

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404


class PayloadTooLarge(APIError):
    status = 413


class Overloaded(APIError):
    """The queue is full, or the model is still loading: come back after `Retry-After` seconds."""

    status = 503
    type = "server_error"

    def __init__(self, message: str, retry_after: float, code: str = "overloaded"):
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class Timeout(APIError):
    status = 504
    type = "server_error"

    def __init__(self, message: str):
        super().__init__(message, code="timeout")


class ServerError(APIError):
    status = 500
    type = "server_error"
