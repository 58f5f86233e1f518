"""Domain errors. The control API maps them to HTTP statuses; the edge to SIP responses.

Each class carries the HTTP ``status`` and the stable machine-readable ``code`` of one
distinct failure (SPEC §5.1): the control API answers an RFC 9457 problem whose ``type``
is ``urn:sipedge:error:<code>``. Clients branch on ``code``, never on the English text.
If you add a class, add its row to docs/api.md ("Error codes"); ``ERROR_CODES`` lists
them all for the OpenAPI document and the tests.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base: a request the store refused, with a message an operator can act on."""

    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(DomainError):
    """An unknown resource, or one the caller's key may not see (404, never 403: ids do not leak)."""

    status = 404
    code = "not_found"
    title = "Not found"


class CallNotFound(NotFound):
    code = "call_not_found"
    title = "No such live call"


class Conflict(DomainError):
    """The request contradicts stored state (already attached, bundles > channels, ...)."""

    status = 409
    code = "conflict"
    title = "Conflict with stored state"


class AdminLoginTaken(Conflict):
    code = "admin_login_taken"
    title = "Login already in use"


class NumberTaken(Conflict):
    code = "number_taken"
    title = "Number already owned"


class NumberAttachedElsewhere(Conflict):
    code = "number_attached_elsewhere"
    title = "Number attached to another profile"


class BusinessAccountExists(Conflict):
    code = "business_account_exists"
    title = "Business account already exists"


class BusinessAccountAttachedElsewhere(Conflict):
    code = "business_account_attached_elsewhere"
    title = "Business account attached to another profile"


class AdminNotAttachable(Conflict):
    code = "admin_not_attachable"
    title = "An administrator login cannot be attached"


class BundlesExceedChannels(Conflict):
    code = "bundles_exceed_channels"
    title = "US bundles would exceed channels"


class InsufficientFunds(Conflict):
    """A movement would take a balance below zero."""

    code = "insufficient_funds"
    title = "Insufficient funds"


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"
    title = "Idempotency-Key reused for another request"


class AccountNotEmpty(Conflict):
    code = "account_not_empty"
    title = "Account still has profiles, numbers or credit"


class ProfileHasLiveCalls(Conflict):
    code = "profile_has_live_calls"
    title = "Profile has live calls"


class Invalid(DomainError):
    """A value is well-formed but not acceptable (names the field)."""

    status = 422
    code = "validation_failed"
    title = "Validation failed"


class ChannelsOutOfRange(Invalid):
    code = "channels_out_of_range"
    title = "Channels out of 1..300"


class NumberInvalid(Invalid):
    code = "number_invalid"
    title = "Not a valid E.164 number"


class WeakPassword(Invalid):
    """A console password that is too short, too long or the login itself (SPEC §5.6)."""

    code = "password_too_weak"
    title = "Password not acceptable"


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"
    title = "Missing, unknown or revoked API key"


class Forbidden(DomainError):
    """The key is valid but its scope does not allow this (read-only, admin-only routes)."""

    status = 403
    code = "forbidden"
    title = "Not allowed for this key"


class RateLimited(DomainError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SignInLocked(RateLimited):
    """Too many failed console sign-ins for this login (or source): refused until the lock ends."""

    code = "sign_in_locked"
    title = "Sign-in locked after repeated failures"


class ClusterUnsupported(Conflict):
    """What a cluster node does not do yet (docs/cluster.md "What is left"): refused, nothing changed."""

    code = "cluster_unsupported"


class ClusterUnavailable(DomainError):
    """A cluster node's agent did not confirm the movement in the engine (docs/cluster.md): it may
    still land, and the same request again (the same ``Idempotency-Key``) moves the money once."""

    status = 503
    code = "cluster_unavailable"
    title = "The cluster did not confirm the movement"


class StoreError(DomainError):
    """The store could not take a write; nothing of it was written (the transaction aborted)."""

    status = 503
    code = "store_unavailable"
    title = "The store cannot write"


class StoreFull(StoreError):
    """No room for new work: the map is full, or the fill would enter the reserve kept for
    finishing calls in progress (docs/storage.md, "A store that cannot write")."""

    status = 507        # RFC 4918 §11.5 Insufficient Storage
    code = "store_full"
    title = "The store is full"


class StoreUnavailable(StoreError):
    """LMDB failed (disk full, I/O error, ...)."""

    status = 503


def _all(cls: type[DomainError]) -> list[type[DomainError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _all(sub)
    return out


#: code -> (status, title) of every domain error (the API adds its protocol-level codes).
ERROR_CODES: dict[str, tuple[int, str]] = {c.code: (c.status, c.title) for c in _all(DomainError)}
