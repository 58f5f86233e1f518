"""Prefix tables as data: the rate table (CSV/JSON) and the US bundle exclusions (the seed's footnote)."""

from __future__ import annotations

import csv
import io
import re
from importlib import resources

from .errors import Invalid
from .models import Rate
from .money import MoneyError, parse_money

RATE_COLUMNS = ("prefix", "rate", "connect_fee", "min_seconds", "increment_seconds", "description")
_PREFIX_RE = re.compile(r"^\+?[0-9]{1,15}$")

# "218632xxxx" -> the NANP prefix 218632; the seed also has "7127256 xxxx" with a stray space.
_EXCLUSION_RE = re.compile(r"\b([0-9]{3,10})\s?x{3,4}\b")


def parse_exclusions(footnote: str) -> list[str]:
    """The excluded US prefixes of the seed's footnote, as E.164 digits with the country code.

    Order kept, duplicates dropped.
    """
    seen: dict[str, None] = {}
    for match in _EXCLUSION_RE.finditer(footnote):
        seen["1" + match.group(1)] = None
    return list(seen)


def shipped_exclusions() -> list[str]:
    """The list shipped with the package (``data/us_bundle_exclusions.txt``, one prefix a line)."""
    text = resources.files("edge.control").joinpath("data/us_bundle_exclusions.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def rate_from_fields(row: dict[str, object], where: str) -> Rate:
    """Validate one rate row (from CSV or JSON); errors name the row and the column."""

    def fail(column: str, message: str) -> Invalid:
        return Invalid(f"{where}.{column}: {message}", field=f"{where}.{column}")

    prefix = str(row.get("prefix") or "").strip()
    if not _PREFIX_RE.match(prefix):
        raise fail("prefix", f"expected 1-15 digits, got {prefix!r}")
    money: dict[str, int] = {}
    for column in ("rate", "connect_fee"):
        value = row.get(column, "0" if column == "connect_fee" else None)
        try:
            money[column] = parse_money(str(value).strip() if value is not None else "")
        except MoneyError as exc:
            raise fail(column, str(exc)) from None
    ints: dict[str, int] = {}
    for column, default, low in (("min_seconds", 0, 0), ("increment_seconds", 1, 1)):
        value = row.get(column, default)
        try:
            ints[column] = int(str(value).strip() if value not in (None, "") else default)
        except ValueError:
            raise fail(column, f"expected an integer, got {value!r}") from None
        if ints[column] < low or ints[column] > 86400:
            raise fail(column, f"must be between {low} and 86400")
    return Rate(
        prefix=prefix.lstrip("+"), rate=money["rate"], connect_fee=money["connect_fee"],
        min_seconds=ints["min_seconds"], increment_seconds=ints["increment_seconds"],
        description=str(row.get("description") or ""),
    )


def parse_rates_csv(text: str) -> list[Rate]:
    """CSV with a header row naming the columns of ``RATE_COLUMNS`` (prefix and rate required)."""
    reader = csv.DictReader(io.StringIO(text))
    try:
        reader.fieldnames  # noqa: B018 -- reading it parses the header row
    except csv.Error as exc:
        raise Invalid(f"not valid CSV: {exc}", field="csv") from None
    if not reader.fieldnames or not {"prefix", "rate"} <= set(reader.fieldnames):
        raise Invalid("CSV needs a header row with at least 'prefix' and 'rate'", field="csv")
    unknown = set(reader.fieldnames) - set(RATE_COLUMNS)
    if unknown:
        raise Invalid(f"unknown CSV columns: {', '.join(sorted(unknown))}", field="csv")
    try:
        return [rate_from_fields(row, f"rates[{i}]") for i, row in enumerate(reader)]
    except csv.Error as exc:   # a bare CR inside a field, a NUL, ...: bad input, not a bug (schemathesis)
        raise Invalid(f"not valid CSV: {exc}", field="csv") from None


def shipped_rates() -> list[Rate]:
    """The sample rate table shipped with the package (``data/sample_rates.csv``)."""
    return parse_rates_csv(resources.files("edge.control").joinpath("data/sample_rates.csv").read_text())
