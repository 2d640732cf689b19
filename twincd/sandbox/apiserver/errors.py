"""Errors as the real API server reports them: ``kind: Status`` bodies."""

from __future__ import annotations

from twincd.sandbox.apiserver.resources import JSON, ResourceType


class ApiError(Exception):
    """A failed request, carried to the HTTP layer as a ``kind: Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body

    @classmethod
    def about(cls, code: int, reason: str, rt: ResourceType, name: str, message: str) -> ApiError:
        return cls(code, reason, message, {"name": name, "group": rt.group, "kind": rt.plural})


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError.about(404, "NotFound", rt, name, f'{rt.qualified} "{name}" not found')


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid(rt: ResourceType, name: str, message: str) -> ApiError:
    return ApiError.about(422, "Invalid", rt, name, f'{rt.kind} "{name}" is invalid: {message}')


def conflict(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError.about(
        409, "Conflict", rt, name, f'Operation cannot be fulfilled on {rt.qualified} "{name}": {why}'
    )


STALE = "the object has been modified; please apply your changes to the latest version and try again"
