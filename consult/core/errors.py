"""One error hierarchy; translated into a response in one place (``consult.core.middleware``)."""

from __future__ import annotations

import errno
import sqlite3

from consult.core.i18n import _


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


class DatabaseUnavailable(ConsultError):
    """The database cannot take writes just now (the writer lost its connection and is retrying)."""

    status = 503
    code = "database_unavailable"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message, code=code)

    # Translated when the response is made, in the request's language: the error may be raised
    # on the writer thread, which has no request and so no language.
    @property
    def message(self) -> str:
        return self._message or _("The database is not available; please try again.")

    @message.setter
    def message(self, value: str) -> None:
        self._message = value

    def __str__(self) -> str:
        return self.message


class StorageFull(ConsultError):
    """The disk under the data directory is full: SQLITE_FULL, ENOSPC or EDQUOT.

    Nothing was saved. The message says so, and never that nothing was lost.
    """

    status = 507
    code = "storage_full"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message, code=code)

    @property
    def message(self) -> str:
        return self._message or _(
            "The hospital's server has run out of storage space. What you just did could not be"
            " completed and was not saved; please try again later or contact the hospital."
        )

    @message.setter
    def message(self, value: str) -> None:
        self._message = value

    def __str__(self) -> str:
        return self.message


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_storage_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk, as SQLite or the OS reports it."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, StorageFull):
            return True
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error):
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                return True
            if "database or disk is full" in str(exc):
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def is_database_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another process holds the database past the busy timeout."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc)
    return "database is locked" in text or "database is busy" in text


def storage_error(exc: BaseException) -> ConsultError | None:
    """The clear error for a low-level failure of the disk or the database, or None."""
    if isinstance(exc, StorageFull | DatabaseUnavailable):
        return exc
    if is_storage_full(exc):
        return StorageFull()
    if is_database_busy(exc):
        return DatabaseUnavailable()
    return None
