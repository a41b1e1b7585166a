"""One error hierarchy; translated into a response in one place (``consult.core.middleware``)."""

from __future__ import annotations


class ConsultError(Exception):
    status = 500
    code = "error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class BadRequest(ConsultError):
    status = 400
    code = "bad_request"


class Unauthorized(ConsultError):
    status = 401
    code = "unauthorized"


class Forbidden(ConsultError):
    status = 403
    code = "forbidden"


class NotFound(ConsultError):
    status = 404
    code = "not_found"


class Conflict(ConsultError):
    status = 409
    code = "conflict"


class Gone(ConsultError):
    status = 410
    code = "gone"


class PayloadTooLarge(ConsultError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ConsultError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(ConsultError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str = "", *, retry_after: int = 60, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
