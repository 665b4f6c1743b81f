"""An output folder opened for reading: its shards as one DuckDB view, their footers, its stats.

DuckDB reads the shards (column projection and predicate pushdown, so a query that does not name
`image` never reads image bytes, and it streams row groups, so memory stays flat in dataset size).
Object storage goes through the same fsspec filesystem as everything else (pipeline/storage.py),
registered with DuckDB. Image bytes are read only by :meth:`Output.read_rows`, one row group at a
time.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.errors import EXIT_INVALID, ShardgenError
from pipeline.spec import StorageSpec
from pipeline.stats import Stats

# Columns that DuckDB adds to every row: the shard's location and the row's place in it.
SHARD = "_shard"
ROW = "file_row_number"
SAMPLE_KEY = "_sample_key"  # a row's seeded hash, by which samples are drawn


class WhereError(ShardgenError):
    """A --where condition that DuckDB cannot run."""

    exit_code = EXIT_INVALID


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sql_list(texts: list[str]) -> str:
    return "[" + ", ".join(sql_string(t) for t in texts) + "]"


def has_image_feature(value: bytes | None) -> bool:
    """Whether a shard's `huggingface` metadata declares `image` as an Image feature."""
    try:
        return json.loads(value)["info"]["features"]["image"]["_type"] == "Image"
    except (TypeError, ValueError, KeyError):
        return False


@dataclass
class Shard:
    name: str  # relative to the output: data/part-….parquet
    rows: int
    row_groups: int
    bytes: int
    huggingface: bool  # its schema metadata declares `image` as a Hugging Face Image

    def to_dict(self) -> dict:
        return asdict(self)


class Output:
    """One output folder (local or object storage) and a DuckDB connection over its shards.

    The view ``rows`` holds every row of every shard plus SHARD and ROW; ``shown`` holds those
    that the ``where`` condition keeps (all of them without one)."""

    def __init__(self, uri: str, where: str | None = None, storage_spec: StorageSpec | None = None,
                 names: list[str] | None = None):
        self.uri = uri.rstrip("/") or uri
        self.storage = storage_spec or StorageSpec()
        self.fs, self.path = storage.filesystem(self.uri, self.storage)
        self.where = where
        self.con = duckdb.connect()
        # Nothing is downloaded: object storage goes through the registered fsspec filesystem.
        self.con.execute("SET autoinstall_known_extensions = false")
        self.con.execute("SET autoload_known_extensions = false")
        if storage.is_remote(self.uri):
            self.con.register_filesystem(self.fs)
        if names is None:  # else only these shards (verify leaves out those whose footer does not open)
            with storage.guard("list", storage.join(self.uri, layout.DATA), self.storage):
                names = self.shard_names()
        self.names = names
        self.locations = [self.location(n) for n in self.names]
        self.paths = {loc: f"{self.path}/{name}" for loc, name in zip(self.locations, self.names)}
        self._names = dict(zip(self.locations, self.names))
        self._shards: list[Shard] | None = None
        self._views = False

    def _make_views(self) -> None:
        """Made on the first query, as DuckDB reads every footer to make them."""
        self._views = True
        if self.names:
            union = "true" if self.schemas() > 1 else "false"
            self.con.execute(f"CREATE VIEW rows AS SELECT * FROM read_parquet({sql_list(self.locations)}, "
                             f"filename = {sql_string(SHARD)}, file_row_number = true, union_by_name = {union})")
            shown = f"CREATE VIEW shown AS SELECT * FROM rows WHERE ({self.where or 'true'})"
            # A condition, not a way to run other statements (the connection could write files).
            if len(self.con.extract_statements(shown)) != 1:
                raise WhereError(f"--where {self.where!r}: one condition, not several SQL statements")
            self.con.execute(shown)

    def schemas(self) -> int:
        """How many different schemas the shards have. union_by_name, which shards of several
        schemas (runs of different versions) need, holds every shard's footer for the whole of
        each query (about 60 KB a shard: 1.4 GB at 20k); this count streams over the footers."""
        return self.con.execute(
            "SELECT count(DISTINCT f) FROM (SELECT string_agg(name || ':' || coalesce(type, '') || ':' || "
            "coalesce(logical_type::VARCHAR, ''), ',' ORDER BY name, type) AS f "
            f"FROM parquet_schema({sql_list(self.locations)}) GROUP BY file_name)").fetchone()[0]

    def location(self, name: str) -> str:
        """What DuckDB and the filesystem call the file ``name`` (relative to the output)."""
        return f"{self.path}/{name}" if not storage.is_remote(self.uri) else storage.join(self.uri, name)

    def name_of(self, location: str) -> str:
        return self._names[location]

    def shard_names(self) -> list[str]:
        data = f"{self.path}/{layout.DATA}"
        if not self.fs.exists(data):
            return []
        names = (f[len(self.path) + 1:] for f in self.fs.find(data))
        # Hidden names are temporary files of writes in progress (storage.write_bytes).
        return sorted(n for n in names if n.endswith(layout.SHARD_SUFFIX) and not n.rsplit("/", 1)[-1].startswith("."))

    def exists(self, name: str) -> bool:
        with storage.guard("look up", storage.join(self.uri, name), self.storage):
            return self.fs.exists(f"{self.path}/{name}")

    def read(self, name: str) -> bytes:
        with storage.guard("read", storage.join(self.uri, name), self.storage):
            return self.fs.cat_file(f"{self.path}/{name}")

    @property
    def finished(self) -> bool:
        return self.exists(layout.SUCCESS)

    def stats(self) -> Stats | None:
        return Stats.from_json(self.read(layout.STATS)) if self.exists(layout.STATS) else None

    def query(self, sql: str, params: list | None = None) -> list[dict]:
        """Rows of a query as dicts (small results only: summaries, samples, ids)."""
        try:
            if not self._views:
                self._make_views()
            cursor = self.con.execute(sql, params or [])
        except duckdb.Error as err:
            if self.where:
                raise WhereError(f"--where {self.where!r}: {err}") from None
            raise
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def batches(self, sql: str) -> pa.RecordBatchReader:
        """The rows of a query as a stream of Arrow batches (results too large to hold)."""
        if not self._views:
            self._make_views()
        return self.con.sql(sql).to_arrow_reader()

    def shards(self) -> list[Shard]:
        """Every shard's rows, row groups and bytes (from its footer) and its Hugging Face metadata."""
        if self._shards is None:
            self._shards = []
            if self.names:
                files = sql_list(self.locations)
                meta = {r["file_name"]: r for r in self.query(
                    f"SELECT file_name, num_rows, num_row_groups, file_size_bytes FROM parquet_file_metadata({files})")}
                hf = {r["file_name"]: r["value"] for r in self.query(
                    f"SELECT file_name, value FROM parquet_kv_metadata({files}) WHERE decode(key) = 'huggingface'")}
                for name, loc in zip(self.names, self.locations):
                    m = meta[loc]
                    self._shards.append(Shard(name, m["num_rows"], m["num_row_groups"], m["file_size_bytes"],
                                              has_image_feature(hf.get(loc))))
        return self._shards

    def row_groups(self) -> dict[str, list[int]]:
        """Each shard's row-group sizes in order, by location."""
        groups: dict[str, list[int]] = defaultdict(list)
        for r in self.query(f"SELECT DISTINCT file_name, row_group_id, row_group_num_rows "
                            f"FROM parquet_metadata({sql_list(self.locations)}) ORDER BY file_name, row_group_id"):
            groups[r["file_name"]].append(r["row_group_num_rows"])
        return groups

    def sample(self, n: int, seed: int, view: str = "shown") -> list[tuple[str, int]]:
        """The places of ``n`` rows with an image, drawn by a seeded hash of their id: the same rows
        for the same seed however DuckDB splits the scan, spread over every shard."""
        return [(r[SHARD], r[ROW]) for r in self.sample_keys(n, seed, view)]

    def sample_keys(self, n: int, seed: int, view: str = "shown") -> list[dict]:
        """The rows ``sample`` draws, each with what it is drawn by (SAMPLE_KEY, then its id): the
        samples of several groups of shards merge into that of them all by it."""
        return self.query(f"SELECT {SHARD}, {ROW}, hash(id, ?::BIGINT) AS {SAMPLE_KEY}, id FROM {view} "
                          f"WHERE image_sha256 IS NOT NULL ORDER BY {SAMPLE_KEY}, id LIMIT ?", [seed, n])

    def read_rows(self, places: list[tuple[str, int]], columns: list[str]) -> Iterator[dict]:
        """The rows at ``places`` (shard location, row number in the shard), read one row group at a
        time with only ``columns``; in shard and row order."""
        groups = self.row_groups()
        wanted: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
        for loc, row in sorted(places):
            start = 0
            for g, size in enumerate(groups[loc]):
                if row < start + size:
                    wanted[(loc, g)].append((row, row - start))
                    break
                start += size
        for (loc, g), rows in wanted.items():
            table = self.read_row_group(loc, g, columns)
            for row, offset in rows:
                yield {SHARD: loc, ROW: row, **table.slice(offset, 1).to_pylist()[0]}

    def read_row_group(self, location: str, group: int, columns: list[str]) -> pa.Table:
        with storage.guard("read", location, self.storage), self.fs.open(self.paths[location], "rb") as f:
            return pq.ParquetFile(f).read_row_group(group, columns=columns)

    def footer(self, location: str) -> pq.FileMetaData:
        """A shard's footer, read through pyarrow (raises what the footer's damage causes)."""
        with storage.guard("read", location, self.storage), self.fs.open(self.paths[location], "rb") as f:
            return pq.ParquetFile(f).metadata
