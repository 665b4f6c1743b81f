"""`shardgen inspect OUTPUT`: what an output holds, as text or JSON, from DuckDB queries that read
only the columns they show (image bytes only for --save)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from pipeline import dates, layout, nightly, storage
from pipeline.encode import EXTENSIONS
from pipeline.inspect.output import ROW, SHARD, Output
from pipeline.spec import StorageSpec

QUANTILES = (0.5, 0.9, 0.99)
# Shards listed one by one in the text form (--json lists every one).
SHARDS_SHOWN = 20
# A prompt or error message in the text form is cut to this many characters.
TEXT_WIDTH = 80
# The first word of an error message (the field or the stage), as the sink counts errors by kind.
ERROR_KIND = "coalesce(nullif(split_part(error, ':', 1), ''), 'unknown')"
FIRST_ROW_COLUMNS = ["id", "status", "width", "height", "stages", "prompt", "error"]


def status_counts(out: Output) -> dict[str, int]:
    counts = {r["status"]: r["n"] for r in out.query("SELECT status, count(*) AS n FROM shown GROUP BY status")}
    return {"ok": counts.pop("ok", 0), "error": counts.pop("error", 0), **dict(sorted(counts.items()))}


def error_kinds(out: Output) -> list[dict]:
    return out.query(f"SELECT {ERROR_KIND} AS kind, count(*) AS rows, min(id) AS example_id, "
                     f"arg_min(error, id) AS example FROM shown WHERE error IS NOT NULL "
                     f"GROUP BY kind ORDER BY rows DESC, kind")


def time_quantiles(out: Output, quantiles: tuple[float, ...] = QUANTILES) -> list[dict]:
    """Seconds per ok row by the chain of stages it went through (the output records each row's
    total time, `elapsed_s`; _stats.json has each stage's total)."""
    q = ", ".join(str(x) for x in quantiles)
    found = out.query(f"SELECT stages, count(*) AS rows, quantile_cont(elapsed_s, [{q}]) AS q, "
                      f"max(elapsed_s) AS max FROM shown WHERE status = 'ok' GROUP BY stages ORDER BY rows DESC")
    return [{"stages": r["stages"], "rows": r["rows"],
             **{f"p{round(x * 100)}": v for x, v in zip(quantiles, r["q"])}, "max": r["max"]} for r in found]


def summarize(out: Output, rows: int = 5) -> dict:
    """Everything `shardgen inspect` shows, as plain data (the --json form)."""
    stats = out.stats()
    summary = {"output": out.uri, "finished": out.finished, "where": out.where,
               "recorded": json.loads(stats.to_json()) if stats else None}
    shards = out.shards()
    if not shards:
        return {**summary, "rows": 0, "status": {}, "errors": [], "seconds_per_row": [], "sizes": [], "models": [],
                "shards": [], "huggingface_metadata": False, "first_rows": []}
    matching = {r[SHARD]: r["n"] for r in out.query(f"SELECT {SHARD}, count(*) AS n FROM shown GROUP BY {SHARD}")}
    status = status_counts(out)
    first = out.query(f"SELECT {', '.join(FIRST_ROW_COLUMNS)}, {SHARD}, {ROW} FROM shown LIMIT {int(rows)}")
    return {
        **summary,
        "rows": sum(status.values()),
        "status": status,
        "errors": error_kinds(out),
        "seconds_per_row": time_quantiles(out),
        "sizes": out.query("SELECT width, height, count(*) AS rows FROM shown WHERE status = 'ok' "
                           "GROUP BY width, height ORDER BY rows DESC, width, height"),
        "models": out.query("SELECT model, scheduler, count(*) AS rows FROM shown WHERE model IS NOT NULL "
                            "GROUP BY model, scheduler ORDER BY rows DESC, model, scheduler"),
        "shards": [{**s.to_dict(), "matching": matching.get(loc, 0)} for s, loc in zip(shards, out.locations)],
        "huggingface_metadata": all(s.huggingface for s in shards),
        "first_rows": [{**r, SHARD: out.name_of(r[SHARD])} for r in first],
    }


def short(text: str | None, width: int = TEXT_WIDTH) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def to_text(s: dict) -> str:
    lines = [f"{s['output']}: " + ("finished (_SUCCESS present)" if s["finished"] else "NOT finished (no _SUCCESS)")]
    rec = s["recorded"]
    if rec:
        busy = ", ".join(f"{st['kind']} {st['busy_s']} s" for st in rec["stages"])
        lines.append(f"recorded in {layout.STATS}: {rec['rows']} rows ({rec['ok']} ok, {rec['error']} error) in "
                     f"{rec['shards']} shard(s); last run {rec['run_id']}: {rec['elapsed_s']} s, "
                     f"{rec['images_per_s']} images/s" + (f"; stage busy time: {busy}" if busy else ""))
    if not s["shards"]:
        lines.append(f"no shards under {layout.DATA}/")
        return "\n".join(lines)
    if s["where"]:
        lines.append(f"where {s['where']}:")
    lines.append(f"rows {s['rows']}: " + ", ".join(f"{k} {v}" for k, v in s["status"].items()))
    if s["errors"]:
        lines.append("errors by kind:")
        lines += [f"  {e['kind']} x{e['rows']}, e.g. {e['example_id']}: {short(e['example'])}" for e in s["errors"]]
    if s["seconds_per_row"]:
        names = [k for k in s["seconds_per_row"][0] if k.startswith("p")] + ["max"]
        lines.append("seconds per ok row, by stages: " + " / ".join(names))
        lines += [f"  {'>'.join(t['stages']) or '(none)'} ({t['rows']} rows): "
                  + " / ".join(f"{t[k]:.3f}" for k in names) for t in s["seconds_per_row"]]
    if s["sizes"]:
        lines.append("sizes (ok rows): " + ", ".join(f"{z['width']}x{z['height']} x{z['rows']}" for z in s["sizes"]))
    if s["models"]:
        lines.append("models: " + ", ".join(f"{m['model']} ({m['scheduler']}) x{m['rows']}" for m in s["models"]))
    shards = s["shards"]
    total = sum(sh["bytes"] for sh in shards)
    hf = ("every one with" if s["huggingface_metadata"]
          else f"{sum(not sh['huggingface'] for sh in shards)} WITHOUT") + " the huggingface schema metadata"
    lines.append(f"shards: {len(shards)}, {sum(sh['rows'] for sh in shards)} rows, "
                 f"{sum(sh['row_groups'] for sh in shards)} row groups, {_mb(total)}; {hf}")
    for sh in shards[:SHARDS_SHOWN]:
        where = f", {sh['matching']} matching" if s["where"] else ""
        lines.append(f"  {sh['name']}: {sh['rows']} rows{where}, {sh['row_groups']} row groups, {_mb(sh['bytes'])}"
                     + ("" if sh["huggingface"] else ", no huggingface metadata"))
    if len(shards) > SHARDS_SHOWN:
        lines.append(f"  … {len(shards) - SHARDS_SHOWN} more (--json lists every shard)")
    if s["first_rows"]:
        lines.append(f"first {len(s['first_rows'])} rows:")
        lines += [f"  {r['id']}: {r['status']} {r['width']}x{r['height']} {'>'.join(r['stages'] or [])} "
                  f"{short(r['prompt'])!r}" + (f" {short(r['error'])}" if r["error"] else "")
                  for r in s["first_rows"]]
    return "\n".join(lines)


def save_images(out: Output, first_rows: list[dict], folder: Path) -> int:
    """Write the images of ``first_rows`` into ``folder``; return how many rows had one."""
    folder.mkdir(parents=True, exist_ok=True)
    places = [(out.location(r[SHARD]), r[ROW]) for r in first_rows]
    saved = 0
    for row in out.read_rows(places, ["id", "image"]):
        image = row["image"] or {}
        if image.get("bytes"):
            # image.path is always one plain file name (encode.image_name), never derived from a path.
            (folder / (image.get("path") or f"{saved}.{EXTENSIONS['png']}")).write_bytes(image["bytes"])
            saved += 1
    return saved


def inspect(output: str, rows: int = 5, save: str | None = None, where: str | None = None,
            as_json: bool = False, storage_spec: StorageSpec | None = None) -> str:
    if nights := partitions(output, storage_spec):
        return nights_index(output, nights, as_json, storage_spec)
    out = Output(output, where, storage_spec)
    summary = summarize(out, rows)
    if save:
        saved = save_images(out, summary["first_rows"], Path(save))
        summary["saved"] = {"folder": save, "images": saved}
    if as_json:
        return json.dumps(summary, indent=2, default=str)
    text = to_text(summary)
    if save:
        text += f"\nsaved {summary['saved']['images']} image(s) of the rows shown under {save}"
    return text


# A root of dated outputs (one output per night: ROOT/date=YYYY-MM-DD/) rather than one output.
PARTITION_PREFIX = f"{dates.PARTITION_KEY}="


def partitions(output: str, storage_spec: StorageSpec | None = None) -> list[str]:
    """The dated outputs under ``output`` when it is such a root (no data/ of its own), else []."""
    fs, path = storage.filesystem(output, storage_spec)
    if fs.exists(f"{path}/{layout.DATA}") or not fs.isdir(path):
        return []
    return sorted(name for name in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
                  if name.startswith(PARTITION_PREFIX))


def nights_index(output: str, nights: list[str], as_json: bool, storage_spec: StorageSpec | None = None) -> str:
    """One line per dated output: finished or not, and its recorded counts."""
    index = []
    for night in nights:
        out = Output(storage.join(output, night), storage_spec=storage_spec)
        stats = out.stats()
        index.append({"partition": night, "finished": out.finished,
                      "rows": stats.rows if stats else None, "ok": stats.ok if stats else None,
                      "error": stats.error if stats else None, "shards": len(out.names)})
    # The nightly history (ROOT/_nights/): each finished night's rate, run and finish time.
    history = nightly.history(output, storage_spec)
    if as_json:
        return json.dumps({"output": output, "partitions": index, "history": [asdict(e) for e in history]}, indent=2)
    lines = [f"{output}: {len(index)} dated output(s); shardgen inspect {output}/{PARTITION_PREFIX}… for one"]
    lines += [f"  {n['partition']}: " + ("finished" if n["finished"] else "NOT finished")
              + (f", {n['rows']} rows ({n['ok']} ok, {n['error']} error)" if n["rows"] is not None else "")
              + f", {n['shards']} shard(s)" for n in index]
    if history:
        lines.append(nightly.describe(output, storage_spec))
    return "\n".join(lines)
