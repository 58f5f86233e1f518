"""Money: integer micro-units in storage, decimal strings at the edges. Never a float.

One unit of currency is ``MICROS`` micro-units, so "0.0200" per minute is 20_000.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

MICROS = 1_000_000
MAX_DECIMALS = 6

# The API accepts a plain decimal: digits, an optional point and up to 6 decimals.
# No sign, no exponent, no thousands separators: provisioning systems send exactly this.
MONEY_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"
_MONEY_RE = re.compile(MONEY_PATTERN)

# A msgspec type for money fields of API bodies: validation names the field on error.
Money = Annotated[str, msgspec.Meta(pattern=MONEY_PATTERN, description="decimal string, up to 6 decimal places")]


class MoneyError(ValueError):
    """A string that is not a non-negative decimal with at most 6 decimal places."""


def parse_money(text: str) -> int:
    """Parse ``"12.34"`` into micro-units (12_340_000).

    :param text: non-negative decimal string with at most 6 decimal places.
    :raises MoneyError: on anything else.
    """
    if not isinstance(text, str) or not _MONEY_RE.match(text):
        raise MoneyError(f"not a decimal amount with up to {MAX_DECIMALS} decimals: {text!r}")
    whole, _, frac = text.partition(".")
    return int(whole) * MICROS + int(frac.ljust(MAX_DECIMALS, "0") or 0)


def format_money(micros: int) -> str:
    """Format micro-units as a decimal string with at least 2 decimals: 12_340_000 -> "12.34"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"
