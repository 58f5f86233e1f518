"""US minute bundle usage (SPEC §3): seconds used per profile and calendar month.

Only the credit engine changes it, in the transactions that reserve and settle calls.
"""

from __future__ import annotations

from .store import Txn, key, reads


def _key(profile_id: str, month: str) -> bytes:
    return key(profile_id, month)


@reads
def seconds_used(txn: Txn, profile_id: str, month: str) -> int:
    """Bundle seconds the profile used (or holds reserved) in ``month`` (``"YYYY-MM"``)."""
    return txn.get_u64("bundle_usage", _key(profile_id, month))


def add_seconds(txn: Txn, profile_id: str, month: str, seconds: int) -> int:
    """Add (or, negative, give back) bundle seconds; :returns: the month's new total."""
    return txn.add_u64("bundle_usage", _key(profile_id, month), seconds)
