"""Dated specs: ``{date}`` and ``{yesterday}`` in a spec's URIs, filled in for one night.

A night is a UTC calendar day, written ``YYYY-MM-DD``. A spec is dated when any of its strings
holds a placeholder; a dated spec (or any spec run for an explicit night) whose ``output`` holds
none writes each night to the Hive-style partition ``OUTPUT/date=YYYY-MM-DD``, so that all nights
under OUTPUT read back as one dataset with a ``date`` column.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

from pipeline.errors import SpecError

DATE = "{date}"
YESTERDAY = "{yesterday}"
PARTITION_KEY = "date"
# Other words in braces where a URI names a night are almost surely a misspelt placeholder.
_UNKNOWN = re.compile(r"\{[a-z_]+\}")
_PARTITION = re.compile(rf"(?:^|/){PARTITION_KEY}=(\d{{4}}-\d{{2}}-\d{{2}})$")


def today() -> date:
    return datetime.now(timezone.utc).date()


def parse_night(text: str | date | None) -> date:
    """A night from ``YYYY-MM-DD``, ``today`` or ``yesterday`` (UTC); None is today."""
    if isinstance(text, date):
        return text
    if text in (None, "", "today"):
        return today()
    if text == "yesterday":
        return today() - timedelta(days=1)
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise SpecError(f"--date: {text!r} is not a night (YYYY-MM-DD, today or yesterday)") from None


def nights(first: date, last: date) -> list[date]:
    """Every night from ``first`` to ``last``, both included, in date order."""
    if last < first:
        raise SpecError(f"--from {first} is after --to {last}")
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def is_dated(data: dict) -> bool:
    """Whether any string of the spec ``data`` holds a placeholder."""
    return any(DATE in s or YESTERDAY in s for s in _strings(data))


def _fill(node: Any, night: date) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, night) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, night) for v in node]
    if isinstance(node, str):
        return node.replace(DATE, night.isoformat()).replace(YESTERDAY, (night - timedelta(days=1)).isoformat())
    return node


def partition(root: str, night: date) -> str:
    return f"{root.rstrip('/')}/{PARTITION_KEY}={night.isoformat()}"


def resolve(data: dict, night: date | str | None) -> dict:
    """The spec ``data`` for one night: placeholders filled in, and the output made the night's
    Hive partition where the spec does not place the night itself. A spec that is not dated and
    is given no night comes back unchanged."""
    for field in ("manifest", "output"):
        value = data.get(field)
        if isinstance(value, str):
            unknown = [w for w in _UNKNOWN.findall(value) if w not in (DATE, YESTERDAY)]
            if unknown:
                raise SpecError(f"{field}: unknown placeholder {unknown[0]} in {value!r}; use {DATE} or {YESTERDAY}")
    if night is None and not is_dated(data):
        return data
    night = parse_night(night)
    output = data.get("output")
    if isinstance(output, str) and DATE not in output and YESTERDAY not in output:
        data = {**data, "output": partition(output, night)}
    return _fill(data, night)


def night_of_output(output: str) -> tuple[str, date] | None:
    """``(root, night)`` for an output that is a night's Hive partition (``ROOT/date=YYYY-MM-DD``)."""
    match = _PARTITION.search(output.rstrip("/"))
    try:
        night = date.fromisoformat(match.group(1)) if match else None
    except ValueError:  # date=2026-13-01: no night
        night = None
    return (output.rstrip("/")[: match.start()] or "/", night) if night else None
