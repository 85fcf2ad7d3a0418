"""Every error the project raises on purpose, on the ground floor: this module imports nothing from
icdistill, so any module can import an error class without importing upward.

``ICDError`` is a user-facing error (its message is shown as one line, without a traceback); the
others narrow it down. ``ServiceError`` is the service's HTTP refusal (rendered by ``service.errors``).
"""

from __future__ import annotations


class ICDError(Exception):
    """A user-facing error: its message is shown as one line, without a traceback."""


class SpecError(ICDError):
    """An unknown or unavailable model spec."""


class DataError(ICDError):
    """A missing dataset, an unreadable image, an empty stream, a label outside the options."""


class TeacherError(ICDError):
    """The teacher failed to answer (timeout, server error, garbage) after its retries."""


class TeacherRefused(TeacherError):
    """The teacher's server refused the request for good (HTTP 401, 403, 404: a wrong key, URL or
    model): retrying cannot help."""


class UsageError(ICDError):
    """A bad command line: exit code 2."""


class MissingDataset(DataError):
    """The dataset a command line names does not exist (a mistyped path): a usage error."""


class TeacherUnavailable(ICDError):
    """The teacher failed too many times in a row: the run stops (resumable) instead of going on blind."""


class PoolUnavailable(ICDError):
    """The pool's database stayed out of reach for ``reconnect_s`` seconds: the work stops here, and
    what was stored is kept (resume once the database is back)."""


class DatabaseUnavailable(ICDError):
    """The database stayed out of reach for ``reconnect_s`` seconds; what was committed is kept
    (the service's store, ``icdistill.pool.pg_reconnect.Reconnecting``)."""


class NotCalled(TeacherError):
    """The teacher was not called for this query (the shared budget is spent, or another worker held
    the claim too long): no answer, but neither a teacher failure nor a call of this worker's."""

    not_called = True


class RaySetupError(ICDError):
    """Ray is missing, unreachable or cannot serve this eval: the command cannot work as given (exit 2)."""


class ServiceError(Exception):
    """A request the service refuses, with an HTTP status (4xx) and a message meant for the caller."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
