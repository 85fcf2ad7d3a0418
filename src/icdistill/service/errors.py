"""Client errors of the service: ``ServiceError`` (defined in ``icdistill.errors``) built per status, and
rendered as ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from starlette.responses import JSONResponse

from icdistill.errors import ServiceError


def bad_request(message: str, code: str = "bad_request") -> ServiceError:
    return ServiceError(400, code, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(404, "not_found", message)


def conflict(message: str) -> ServiceError:
    return ServiceError(409, "conflict", message)


def unprocessable(message: str, code: str = "invalid_field") -> ServiceError:
    return ServiceError(422, code, message)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "status": status}}, status, headers=headers
    )
