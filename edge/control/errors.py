"""Domain errors. The control API maps them to HTTP statuses; the edge to SIP responses."""


class DomainError(Exception):
    """Base: a request the store refused, with a message an operator can act on."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(DomainError):
    status = 404


class Conflict(DomainError):
    """The request contradicts stored state (already attached, bundles > channels, ...)."""

    status = 409


class Invalid(DomainError):
    """A value is well-formed but not acceptable (names the field)."""

    status = 422


class InsufficientFunds(Conflict):
    """A movement would take a balance below zero."""


class StoreError(DomainError):
    """The store could not take a write; nothing of it was written (the transaction aborted)."""

    status = 503


class StoreFull(StoreError):
    """No room for new work: the map is full, or the fill would enter the reserve kept for
    finishing calls in progress (docs/storage.md, "A store that cannot write")."""

    status = 507        # RFC 4918 §11.5 Insufficient Storage


class StoreUnavailable(StoreError):
    """LMDB failed (disk full, I/O error, ...)."""

    status = 503
