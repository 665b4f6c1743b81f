"""`shardgen inspect OUTPUT --html report.html`: one self-contained static page.

The page holds the summary, a contact sheet of thumbnails sampled across shards, error rows as
cards, and charts as embedded PNGs. It loads nothing: its Content-Security-Policy allows inline
styles and data: images only, and it has no scripts. Prompts and messages are user data; the
template autoescapes every value, so none of them can become markup.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone

from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib.figure import Figure
from PIL import Image

from pipeline import storage
from pipeline.inspect.output import SHARD, Output
from pipeline.inspect.summary import short, summarize, time_quantiles
from pipeline.spec import StorageSpec

THUMBNAIL = 160  # pixels, the longer side
ERROR_CARDS = 24
SHARDS_LISTED = 200
PROMPT_SHOWN = 60  # characters of a caption's prompt; the whole prompt is its title (on hover)
CAPTION_COLUMNS = ["id", "image", "prompt", "seed", "steps", "status", "width", "height"]
# Quantiles drawn as the boxes (5-95 whiskers, 25-75 box, median) of the time chart.
BOX_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
TIME_BINS = 60

_env = Environment(loader=PackageLoader("pipeline.inspect", "templates"), autoescape=True,
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(data: bytes) -> str:
    """A small WebP of an image, as a data: URI."""
    with Image.open(io.BytesIO(data)) as img:
        img.thumbnail((THUMBNAIL, THUMBNAIL))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="WEBP", quality=80)
    return data_uri(buf.getvalue(), "image/webp")


def contact_sheet(out: Output, sample: int, seed: int) -> list[dict]:
    """``sample`` rows with an image (Output.sample), read one row group at a time."""
    cards = []
    for row in out.read_rows(out.sample(sample, seed), CAPTION_COLUMNS):
        card = {k: row[k] for k in CAPTION_COLUMNS if k != "image"}
        card.update(shard=out.name_of(row[SHARD]), prompt_short=short(row["prompt"], PROMPT_SHOWN), src=None,
                    problem=None)
        data = (row["image"] or {}).get("bytes")
        try:
            card["src"] = thumbnail(data) if data else None
        except (OSError, ValueError) as err:  # Pillow's errors for bytes that are no image
            card["problem"] = f"does not decode: {err}"
        cards.append(card)
    return sorted(cards, key=lambda c: c["id"])


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return data_uri(buf.getvalue(), "image/png")


def time_chart(out: Output) -> str | None:
    """Seconds per ok row, one box per chain of stages."""
    found = time_quantiles(out, BOX_QUANTILES)
    if not found:
        return None
    fig = Figure(figsize=(7, 0.6 + 0.5 * len(found)), dpi=100)
    ax = fig.subplots()
    ax.bxp([{"label": f"{'>'.join(t['stages']) or '(none)'} ({t['rows']})", "whislo": t["p5"], "q1": t["p25"],
             "med": t["p50"], "q3": t["p75"], "whishi": t["p95"], "fliers": []} for t in found],
           orientation="horizontal", showfliers=False)
    ax.set_xlabel("seconds per ok row (box: 25-75%, whiskers: 5-95%)")
    ax.set_title("time per image, by stages")
    return _png(fig)


def images_over_time(out: Output) -> str | None:
    """Images made (ok rows by created_at), cumulative, in TIME_BINS steps."""
    bins = out.query(f"""
        WITH t AS (SELECT epoch(created_at) AS s FROM shown WHERE status = 'ok' AND created_at IS NOT NULL),
             span AS (SELECT min(s) AS lo, greatest((max(s) - min(s)) / {TIME_BINS}, 1e-6) AS step FROM t)
        SELECT any_value(lo) AS lo, any_value(step) AS step, least(floor((s - lo) / step), {TIME_BINS - 1}) AS bin,
               count(*) AS n
        FROM t, span GROUP BY bin ORDER BY bin""")
    if not bins:
        return None
    lo, step = bins[0]["lo"], bins[0]["step"]
    x = [0.0] + [(b["bin"] + 1) * step / 60 for b in bins]
    y, total = [0], 0
    for b in bins:
        total += b["n"]
        y.append(total)
    fig = Figure(figsize=(7, 3), dpi=100)
    ax = fig.subplots()
    ax.step(x, y, where="post")
    ax.set_xlabel(f"minutes since {datetime.fromtimestamp(lo, timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    ax.set_ylabel("images")
    ax.set_title("images over time")
    return _png(fig)


def render(out: Output, sample: int, seed: int) -> str:
    summary = summarize(out, rows=0)
    errors = out.query(f"SELECT id, error, prompt, seed, steps FROM shown WHERE status = 'error' "
                       f"ORDER BY id LIMIT {ERROR_CARDS}") if out.names else []
    return _env.get_template("report.html.j2").render(
        s=summary,
        cards=contact_sheet(out, sample, seed) if out.names and sample > 0 else [],
        sample=sample,
        seed=seed,
        errors=[{**e, "prompt_short": short(e["prompt"], PROMPT_SHOWN)} for e in errors],
        error_rows=summary["status"].get("error", 0),
        time_chart=time_chart(out) if out.names else None,
        over_time=images_over_time(out) if out.names else None,
        shards=summary["shards"][:SHARDS_LISTED],
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    )


def write_report(output: str, html: str, where: str | None = None, sample: int = 48, seed: int = 0,
                 storage_spec: StorageSpec | None = None) -> str:
    """Write the report of ``output`` to ``html`` (a local path or a URI); return a line saying so."""
    page = render(Output(output, where, storage_spec), sample, seed)
    storage.write_bytes(html, page.encode("utf-8"), storage_spec)
    return f"shardgen inspect: wrote {html} ({len(page) / 1e6:.1f} MB)"
