"""Nights of a dated spec: which are complete, catching up the rest in date order, and the
history of finished nights at the nightly root.

ROOT/
  date=YYYY-MM-DD/      one night's output (the usual layout, pipeline/layout.py)
  _nights/YYYY-MM-DD.json   that night's line of the history, written when it finished

One small file per night, each written whole: two nights that finish at once write different
files, so neither can lose the other's line (object storage has no atomic read-modify-write of
one shared index). A rerun of a night replaces its own line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone

from pipeline import dates, layout, storage
from pipeline.errors import EXIT_FAILED, EXIT_OK, ShardgenError, SpecError
from pipeline.spec import JobSpec, StorageSpec
from pipeline.stats import Stats

INDEX = "_nights"


@dataclass
class Night:
    night: date
    spec: JobSpec  # the spec filled in for this night


@dataclass
class Entry:
    """One night's line of the history (ROOT/_nights/NIGHT.json)."""

    night: str
    output: str
    run_id: str
    rows: int
    ok: int
    error: int
    images_per_s: float | None
    elapsed_s: float
    finished_at: str


@dataclass
class Outcome:
    """What catching up did with one night (a row of the table)."""

    night: date
    status: str  # complete (skipped), done, running (elsewhere), failed, too many errors, refused
    code: int
    stats: Stats | None = None
    error: str = ""


def load_nights(spec_uri: str, nights: list[date], **overrides) -> tuple[str, list[Night]]:
    """The spec at ``spec_uri`` filled in for each night, and the nightly root their outputs
    share."""
    from pipeline.job import load_spec

    loaded = [Night(n, load_spec(spec_uri, n, **overrides)) for n in nights]
    # Two different nights' outputs differ exactly where the night goes: the root is before it.
    probe = [loaded[0].spec.output, load_spec(spec_uri, loaded[0].night + timedelta(days=1), **overrides).output]
    if probe[0] == probe[1]:
        raise SpecError(f"output: {probe[0]} is the same for every night; put {dates.DATE} in it")
    return os.path.commonprefix(probe).rsplit("/", 1)[0], loaded


def is_complete(spec: JobSpec) -> bool:
    return storage.exists(storage.join(spec.output, layout.SUCCESS), spec.storage)


def stats_of(spec: JobSpec) -> Stats | None:
    uri = storage.join(spec.output, layout.STATS)
    return Stats.from_json(storage.read_bytes(uri, spec.storage)) if storage.exists(uri, spec.storage) else None


def record(spec: JobSpec, stats: Stats) -> None:
    """Add a finished night's line to the history at its root; outputs that are no night's Hive
    partition (ROOT/date=YYYY-MM-DD) have no history."""
    found = dates.night_of_output(spec.output)
    if found is None or stats.skipped:
        return
    root, night = found
    entry = Entry(night.isoformat(), spec.output, stats.run_id, stats.rows, stats.ok, stats.error,
                  stats.images_per_s, stats.elapsed_s, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    storage.write_bytes(storage.join(root, INDEX, f"{night.isoformat()}.json"),
                        (json.dumps(asdict(entry), indent=2) + "\n").encode(), spec.storage)


def history(root: str, storage_spec: StorageSpec | None = None) -> list[Entry]:
    """Every finished night's line, in date order."""
    folder = storage.join(root, INDEX)
    if not storage.exists(folder, storage_spec):
        return []
    names = sorted(n for n in storage.list_files(folder, storage_spec) if n.endswith(".json") and "/" not in n)
    return [Entry(**json.loads(storage.read_bytes(storage.join(folder, n), storage_spec))) for n in names]


def describe(root: str, storage_spec: StorageSpec | None = None) -> str:
    """The history of the nights under ``root`` as a table (for `shardgen inspect ROOT`)."""
    entries = history(root, storage_spec)
    if not entries:
        return f"{root}: no finished nights (no {INDEX}/)"
    rows = [(e.night, str(e.rows), str(e.ok), str(e.error), _rate(e.images_per_s), e.run_id, e.finished_at)
            for e in entries]
    head = ("night", "rows", "ok", "error", "images/s", "run", "finished")
    return f"{root}: {len(entries)} finished night(s)\n" + _table(head, rows)


def _rate(value: float | None) -> str:
    return f"{value:.2f}" if value else "-"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def outcome_table(outcomes: list[Outcome]) -> str:
    rows = []
    for o in outcomes:
        counts = (str(o.stats.rows), str(o.stats.ok), str(o.stats.error)) if o.stats else ("-", "-", "-")
        # A skipped night ran earlier: its rate is in the history, not news of this catch-up.
        rate = _rate(o.stats.images_per_s) if o.stats and o.status != "complete" else "-"
        rows.append((o.night.isoformat(), o.status, *counts, rate, o.error.splitlines()[0] if o.error else ""))
    return _table(("night", "status", "rows", "ok", "error", "images/s", "message"), rows)


def run_local(night: Night, log: Callable[[str], None] = print) -> Outcome:
    """Run one night in this process (resuming a half-finished output) and record it."""
    from pipeline.job import exit_code, run_job, summary_line

    try:
        stats = run_job(night.spec, log=log)
    except ShardgenError as err:
        return Outcome(night.night, "failed" if err.exit_code == EXIT_FAILED else "refused", err.exit_code,
                       error=str(err))
    record(night.spec, stats)
    log(summary_line(night.spec, stats))
    code = exit_code(night.spec, stats)
    return Outcome(night.night, "done" if code == EXIT_OK else "too many errors", code, stats)


def catch_up(spec_uri: str, first: date, last: date, run: Callable[[Night], Outcome], missing_only: bool,
             log: Callable[[str], None] = print, **overrides) -> list[Outcome]:
    """Run each night from ``first`` to ``last`` that is not complete, in date order, with
    ``run`` (run_local, or a submission to a cluster); complete nights are skipped, and left out
    of the outcomes when ``missing_only``."""
    _, nights = load_nights(spec_uri, dates.nights(first, last), **overrides)
    outcomes = []
    for night in nights:
        if is_complete(night.spec):
            if not missing_only:
                outcomes.append(Outcome(night.night, "complete", EXIT_OK, stats_of(night.spec)))
            continue
        log(f"shardgen nightly: night {night.night} -> {night.spec.output}")
        outcomes.append(run(night))
    return outcomes


def first_night(root: str, storage_spec: StorageSpec | None = None) -> date | None:
    """The earliest night under ``root`` with an output folder or a history line."""
    fs, path = storage.filesystem(root, storage_spec)
    with storage.guard("list", root, storage_spec):
        if not fs.exists(path):
            return None
        folders = [dates.night_of_output(name) for name in fs.ls(path, detail=False)]
    found = [night for _, night in filter(None, folders)]
    found += [date.fromisoformat(e.night) for e in history(root, storage_spec)]
    return min(found, default=None)
