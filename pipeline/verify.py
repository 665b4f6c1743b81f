"""`shardgen verify OUTPUT [--manifest M] [--deep] [--sample N]`: check that an output is whole.

- _SUCCESS is present, and _stats.json and _SUCCESS count the rows the shards hold;
- every shard's footer opens, all shards share one schema, and each declares `image` as a
  Hugging Face Image in its `huggingface` schema metadata;
- ids are unique and not null (the `id` column only); with a manifest, every manifest id is in the
  output exactly once and the output holds no other;
- `status = ok` exactly where an image is present: per row against `image_sha256`, and per row
  group against the footer's null count of `image.bytes` (so image bytes are not read);
- with --deep, every image (or a seeded sample of --sample N): its sha256 is `image_sha256`, it
  decodes fully, and its size is the row's `width` x `height`; rows whose status is not ok carry
  no image bytes.

Exit 0 when every check holds; 1, with a JSON list of what failed, when one does not.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow.dataset as pads
from PIL import Image

from pipeline import id_checks, layout, storage
from pipeline.errors import EXIT_FAILED, EXIT_OK
from pipeline.inspect.output import ROW, SAMPLE_KEY, SHARD, Output, has_image_feature, sql_list
from pipeline.spec import StorageSpec

EXAMPLES = 10  # ids or shards named per failed check
# Shards per DuckDB query: a query holds about 14 KB of every shard it reads until it ends, so the
# checks over every row read the shards in groups of this many (about 14 MB a group).
GROUP_SHARDS = 1000
TOTAL = "_found"  # the column of a query's row count (first_rows)
DEEP_COLUMNS = ["id", "status", "image", "image_sha256", "width", "height"]
IMAGE_BYTES = "image, bytes"  # the leaf column's path as parquet_metadata names it


@dataclass
class Failure:
    check: str
    message: str
    examples: list = field(default_factory=list)


@dataclass
class Report:
    output: str
    failures: list[Failure] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    shards: int = 0
    rows: int = 0
    images_checked: int = 0
    deep: bool = False

    def fail(self, check: str, message: str, examples: list | None = None) -> None:
        self.failures.append(Failure(check, message, list(examples or [])[:EXAMPLES]))

    def to_json(self) -> str:
        return json.dumps([asdict(f) for f in self.failures], indent=2, default=str)

    def line(self) -> str:
        deep = f", {self.images_checked} image(s) read" if self.deep else ""
        return (f"shardgen verify: {self.output}: ok: {self.shards} shard(s), {self.rows} rows{deep}; "
                f"checked {', '.join(self.checked)}")


def check_footers(out: Output, report: Report) -> list[str]:
    """Open every footer; check one schema and the huggingface metadata. Returns the readable shards.
    Each footer is let go once read: what is kept per shard is its name, under its schema's text
    (a few schemas, whatever the number of shards)."""
    readable, broken, missing = [], [], []
    by_schema: dict[str, list[str]] = {}
    for name, loc in zip(out.names, out.locations):
        try:
            meta = out.footer(loc)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            broken.append(f"{name}: {type(err).__name__}: {err}")
            continue
        readable.append(name)
        schema = meta.schema.to_arrow_schema()
        by_schema.setdefault(str(schema.remove_metadata()), []).append(name)
        if not has_image_feature((schema.metadata or {}).get(b"huggingface")):
            missing.append(name)
        report.rows += meta.num_rows
    if broken:
        report.fail("footers", f"{len(broken)} shard(s) whose Parquet footer does not open", broken)
    report.checked.append("footers")
    if by_schema:
        # The schema most shards have is the reference, so that the odd shards are the ones named.
        usual = max(by_schema, key=lambda s: len(by_schema[s]))
        differ = [f"{n}: {s}" for s, names in by_schema.items() if s != usual for n in names]
        if differ:
            report.fail("schema", f"{len(differ)} shard(s) whose schema differs from that of the other "
                        f"{len(readable) - len(differ)}", differ)
        if missing:
            report.fail("huggingface", f"{len(missing)} shard(s) without the huggingface schema metadata "
                        "declaring `image` an Image", missing)
        report.checked += ["schema", "huggingface"]
    return readable


def check_counts(out: Output, report: Report) -> None:
    """_stats.json and _SUCCESS count the rows and shards there are."""
    stats = out.stats()
    if stats is None:
        report.fail("stats", f"no {layout.STATS}")
    else:
        if stats.rows != report.rows:
            report.fail("stats", f"{layout.STATS} counts {stats.rows} rows, the shards hold {report.rows}")
        if stats.shards != len(out.names):
            report.fail("stats", f"{layout.STATS} counts {stats.shards} shards, {layout.DATA}/ holds {len(out.names)} "
                        "that open")
    if out.exists(layout.SUCCESS):
        try:
            rows = json.loads(out.read(layout.SUCCESS))["rows"]
        except (ValueError, KeyError, TypeError):
            report.fail("success", f"{layout.SUCCESS} does not say how many rows the output holds")
        else:
            if rows != report.rows:
                report.fail("success", f"{layout.SUCCESS} counts {rows} rows, the shards hold {report.rows}")
    report.checked.append("counts")


def groups(names: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(names), size):
        yield names[start:start + size]


def first_rows(con, sql: str, order: str) -> tuple[int, list[dict]]:
    """How many rows a query gives and the first EXAMPLES of them by ``order``, as dicts."""
    cursor = con.execute(f"SELECT *, count(*) OVER () AS {TOTAL} FROM ({sql}) ORDER BY {order} LIMIT {EXAMPLES}")
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    return (rows[0][TOTAL] if rows else 0), rows


@dataclass
class Found:
    """What a check found over every group of shards: how many, and the first few examples."""

    count: int = 0
    examples: list = field(default_factory=list)

    def add(self, count: int, examples: list) -> None:
        self.count += count
        self.examples += examples[:EXAMPLES - len(self.examples)]


def collect_ids(part: Output, ids) -> None:
    """Stream the ids of the shards of ``part`` into the table ``output_ids`` of the connection ``ids``."""
    ids.register("part_ids", part.batches("SELECT id FROM rows"))
    ids.execute("INSERT INTO output_ids SELECT id FROM part_ids")
    ids.unregister("part_ids")


def check_ids(ids, report: Report) -> None:
    """Ids unique and not null, over ``output_ids`` (every shard's ids)."""
    nulls = ids.execute("SELECT count(*) FILTER (WHERE id IS NULL) FROM output_ids").fetchone()[0]
    if nulls:
        report.fail("ids", f"{nulls} row(s) with a null id")
    count, dup = first_rows(ids, "SELECT id, count(*) AS n FROM output_ids WHERE id IS NOT NULL GROUP BY id "
                                 "HAVING n > 1", "id")
    if count:
        report.fail("ids", f"{count} id(s) in more than one row", [f"{d['id']} x{d['n']}" for d in dup])
    report.checked.append("ids")


def manifest_files(manifest: str, storage_spec: StorageSpec) -> list[str]:
    """The manifest's Parquet files, as the job reads them (a file, or every file of a folder)."""
    fs, path = storage.arrow_filesystem(manifest, storage_spec)
    with storage.guard("list", manifest, storage_spec):
        files = pads.dataset(path, filesystem=fs, format="parquet").files
    return [f if not storage.is_remote(manifest) else f"{storage.scheme(manifest)}://{f}" for f in files]


def check_manifest(ids, manifest: str, storage_spec: StorageSpec, report: Report) -> None:
    """Every manifest id in ``output_ids`` exactly once (duplicates are check_ids'), and no other id."""
    if storage.is_remote(manifest):
        ids.register_filesystem(storage.filesystem(manifest, storage_spec)[0])
    files = sql_list(manifest_files(manifest, storage_spec))
    ids.execute(f"CREATE VIEW manifest AS SELECT id FROM read_parquet({files}, union_by_name = true)")
    rows = ids.execute("SELECT count(*) FROM manifest").fetchone()[0]
    if rows != report.rows:
        report.fail("manifest", f"the manifest has {rows} rows, the output {report.rows}")
    count, missing = first_rows(ids, "SELECT id FROM manifest ANTI JOIN output_ids USING (id)", "id")
    if count:
        report.fail("manifest", f"{count} manifest id(s) not in the output", [m["id"] for m in missing])
    count, extra = first_rows(ids, "SELECT id FROM output_ids ANTI JOIN manifest USING (id)", "id")
    if count:
        report.fail("manifest", f"{count} output id(s) not in the manifest", [m["id"] for m in extra])
    report.checked.append("manifest")


def check_status(out: Output, rows: Found, row_groups: Found) -> None:
    """status = ok exactly where an image is, in the shards of ``out``: per row by image_sha256, per
    row group by the footer's null count of image.bytes (the bytes themselves are read by --deep only)."""
    count, found = first_rows(out.con, "SELECT id, status FROM rows WHERE (status = 'ok') IS DISTINCT FROM "
                                       "(image_sha256 IS NOT NULL)", "id")
    rows.add(count, [f"{r['id']}: status {r['status']}" for r in found])
    count, found = first_rows(out.con, f"""
        WITH g AS (
            SELECT file_name, row_group_id, row_group_num_rows AS n, stats_null_count AS nulls,
                   sum(row_group_num_rows) OVER (PARTITION BY file_name ORDER BY row_group_id) - row_group_num_rows
                   AS first
            FROM parquet_metadata({sql_list(out.locations)}) WHERE path_in_schema = '{IMAGE_BYTES}'),
        not_ok AS (SELECT {SHARD}, {ROW} FROM rows WHERE status IS DISTINCT FROM 'ok')
        SELECT g.file_name, g.row_group_id, any_value(g.nulls) AS nulls, count(not_ok.{ROW}) AS not_ok
        FROM g LEFT JOIN not_ok ON not_ok.{SHARD} = g.file_name AND not_ok.{ROW} >= g.first
                                AND not_ok.{ROW} < g.first + g.n
        GROUP BY g.file_name, g.row_group_id
        HAVING any_value(g.nulls) IS DISTINCT FROM count(not_ok.{ROW})""", "file_name, row_group_id")
    row_groups.add(count, [f"{out.name_of(g['file_name'])} row group {g['row_group_id']}: {g['nulls']} null "
                           f"image(s), {g['not_ok']} row(s) not ok" for g in found])


def report_status(rows: Found, row_groups: Found, report: Report) -> None:
    if rows.count:
        report.fail("status", f"{rows.count} row(s) whose status disagrees with image_sha256 (ok exactly where "
                    "an image is)", rows.examples)
    if row_groups.count:
        report.fail("status", f"{row_groups.count} row group(s) whose rows without an image (image.bytes null) are "
                    "not those whose status is not ok", row_groups.examples)
    report.checked.append("status")


def parts(out: Output) -> Iterator[Output]:
    """The shards of ``out`` as Outputs of GROUP_SHARDS shards each, one open at a time: a DuckDB
    query holds about 14 KB of every shard it reads until it ends."""
    for group in groups(out.names, GROUP_SHARDS):
        part = Output(out.uri, storage_spec=out.storage, names=group)
        try:
            yield part
        finally:
            part.con.close()


def check_rows(out: Output, manifest: str | None, report: Report) -> None:
    """The checks over every row (ids, manifest, status), a group of shards at a time (``parts``);
    the ids go to one table of their own (pipeline/id_checks.py: bounded memory, spilled to disk
    beyond it)."""
    rows, row_groups = Found(), Found()
    with id_checks.connection() as ids:
        ids.execute("CREATE TABLE output_ids (id VARCHAR)")
        for part in parts(out):
            collect_ids(part, ids)
            check_status(part, rows, row_groups)
        check_ids(ids, report)
        if manifest:
            check_manifest(ids, manifest, out.storage, report)
    report_status(rows, row_groups, report)


def image_problem(row: dict) -> str | None:
    """What is wrong with one row's image, or None."""
    data = (row["image"] or {}).get("bytes")
    if row["status"] != "ok":
        return f"status {row['status']} but image bytes present" if data else None
    if not data:
        return "status ok but no image bytes"
    if hashlib.sha256(data).hexdigest() != row["image_sha256"]:
        return f"sha256 {hashlib.sha256(data).hexdigest()} is not image_sha256 {row['image_sha256']}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = img.size
    except (OSError, ValueError, SyntaxError) as err:  # what Pillow raises for damaged data
        return f"does not decode: {type(err).__name__}: {err}"
    if size != (row["width"], row["height"]):
        return f"decodes to {size[0]}x{size[1]}, the row says {row['width']}x{row['height']}"
    return None


def check_images(out: Output, report: Report, sample: int | None, seed: int, log) -> None:
    """Read images one row group at a time: every one, or ``sample`` rows with an image (Output.sample)."""
    bad = []
    for row in _sampled_rows(out, sample, seed) if sample is not None else _every_row(out, log):
        report.images_checked += (row["image"] or {}).get("bytes") is not None
        if problem := image_problem(row):
            bad.append(f"{row['id']}: {problem}")
    if bad:
        report.fail("images", f"{len(bad)} row(s) whose image is not what the row says", bad)
    report.deep = True
    report.checked.append("deep" if sample is None else f"deep (sample of {sample}, seed {seed})")


def _sampled_rows(out: Output, sample: int, seed: int) -> Iterator[dict]:
    """The rows Output.sample would draw over all the shards, drawn group by group and merged."""
    drawn: list[dict] = []
    for part in parts(out):
        drawn = heapq.nsmallest(sample, drawn + part.sample_keys(sample, seed, view="rows"),
                                key=lambda r: (r[SAMPLE_KEY], r["id"]))
    wanted = {(r[SHARD], r[ROW]) for r in drawn}
    for part in parts(out):
        places = [place for place in wanted if place[0] in part.paths]
        if places:
            yield from part.read_rows(places, DEEP_COLUMNS)


def _every_row(out: Output, log):
    done = 0
    for part in parts(out):
        groups = part.row_groups()
        for loc in part.locations:
            done += 1
            log(f"shardgen verify: reading images of shard {done}/{len(out.locations)}: {part.name_of(loc)}")
            for g in range(len(groups[loc])):
                yield from part.read_row_group(loc, g, DEEP_COLUMNS).to_pylist()


def verify(output: str, manifest: str | None = None, deep: bool = False, sample: int | None = None, seed: int = 0,
           storage_spec: StorageSpec | None = None, log=lambda line: print(line, file=sys.stderr)) -> Report:
    out = Output(output, storage_spec=storage_spec)
    report = Report(output)
    if not out.finished:
        report.fail("success", f"no {layout.SUCCESS}: the run did not finish")
    report.checked.append("success")
    if not out.names:
        report.fail("shards", f"no shards under {layout.DATA}/")
        return report
    readable = check_footers(out, report)
    if readable != out.names:  # DuckDB reads only the shards whose footer opens
        out = Output(output, storage_spec=storage_spec, names=readable)
    report.shards = len(readable)
    check_counts(out, report)
    if not readable:
        return report
    check_rows(out, manifest, report)
    if deep:
        check_images(out, report, sample, seed, log)
    return report


def main(output: str, manifest: str | None = None, deep: bool = False, sample: int | None = None,
         seed: int = 0) -> int:
    report = verify(output, manifest, deep, sample, seed)
    if report.failures:
        print(report.to_json())
        return EXIT_FAILED
    print(report.line())
    return EXIT_OK
