"""Errors the service turns into HTTP statuses; each carries a stable machine-readable code."""

from __future__ import annotations


class ServiceError(Exception):
    """Base: ``status`` is the HTTP status, ``code`` a short identifier, the message is for humans."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotReadyError(ServiceError):
    status, code = 503, "not_ready"


class EditorUnavailableError(ServiceError):
    status, code = 409, "editor_unavailable"


class EditNotFoundError(ServiceError):
    status, code = 404, "edit_not_found"


class AlreadyRolledBackError(ServiceError):
    status, code = 409, "already_rolled_back"


class IdempotencyConflictError(ServiceError):
    status, code = 409, "idempotency_key_reused"


class EditRejectedError(ServiceError):
    status, code = 422, "edit_rejected"


class WriterUnavailableError(ServiceError):
    status, code = 503, "writer_unavailable"


class JournalMismatchError(ServiceError):
    """Replaying the journal did not reproduce the recorded weights (startup refuses to serve)."""

    status, code = 503, "journal_mismatch"
