"""Filters that mark rows, never drop them: exact duplicates (image_sha256), near duplicates
(perceptual hash, imagehash.phash) and classifier confidence (keep a row only if the classifier
gives its class a probability above a threshold: by default 1/C, C the classes of the job's rows).

Two parts:
- ``score_batch``, a step of the plan (beside the other CPU steps), adds to every row its
  perceptual hash (`phash`), its class probability (`label_prob`) and an empty `filter_reason`;
- ``apply``, after every shard is written, decides over the whole output (duplicates need the
  global view): in id order, a row fails confidence, else repeats an earlier kept row's image
  (exact), else lies within `near_duplicate_distance` bits of one (near). Shards whose rows change
  are rewritten whole (storage.write_bytes: atomic); the decisions are a function of the written
  scores alone, so a rerun after a crash rewrites the same shards the same way (idempotent).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline import columns, manifest, storage
from pipeline.errors import SpecError
from pipeline.output_schema import FILTERED, PHASH, PROB, REASON
from pipeline.spec import ConfidenceFilterSpec, FiltersSpec, JobSpec
from pipeline.writers.parquet import ParquetWriter

if TYPE_CHECKING:
    from pipeline.synth.classifiers import Classifier

# Filter kinds, in the order they are applied; a reason starts with its kind.
LOW_CONFIDENCE, EXACT, NEAR = "low_confidence", "exact_duplicate", "near_duplicate"


@lru_cache(maxsize=2)
def _classifier(model: str) -> Classifier:
    # Imported here: torch is only needed where a confidence filter runs, and the plan (imported
    # by every write task) imports this module.
    from pipeline.synth.classifiers import load_classifier

    return load_classifier(model)


def check(spec: JobSpec) -> None:
    """Refuse, before any generation, a confidence filter whose label column is missing or names
    classes that its classifier does not know."""
    conf = spec.filters.confidence if spec.filters else None
    if conf is None:
        return
    dataset = manifest.open_manifest(spec)
    if conf.label_column not in dataset.schema.names:
        raise SpecError(f"filters.confidence.label_column: the manifest has no column {conf.label_column!r} "
                        f"(it has {dataset.schema.names})")
    labels = dataset.to_table(columns=[conf.label_column]).column(conf.label_column)
    unknown = sorted(set(labels.drop_null().to_pylist()) - set(_classifier(conf.model).names))
    if unknown:
        raise SpecError(f"filters.confidence.model: {conf.model} does not know the class(es) {unknown[:10]} of "
                        f"column {conf.label_column!r}; it knows {_classifier(conf.model).names}")


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _probabilities(table: pa.Table, images: list[Image.Image | None], conf: ConfidenceFilterSpec) -> list[float | None]:
    rows = [i for i, im in enumerate(images) if im is not None]
    probs: list[float | None] = [None] * len(images)
    if not rows:
        return probs
    classifier = _classifier(conf.model)
    p = classifier.probabilities(np.stack([np.asarray(images[i]) for i in rows]))
    labels = table.column(conf.label_column).to_pylist()
    for k, i in enumerate(rows):
        probs[i] = float(p[k, classifier.names.index(labels[i])])
    return probs


def score_batch(table: pa.Table, filters: FiltersSpec) -> pa.Table:
    """The plan's scoring step: `phash`, `label_prob` and an empty `filter_reason` for each row
    (null where the row has no image, i.e. an error row)."""
    data = table.column(columns.IMAGE_BYTES).to_pylist()
    images = [_decode(b) if b else None for b in data]
    phashes = [str(imagehash.phash(im)) if im is not None else None for im in images]
    probs = _probabilities(table, images, filters.confidence) if filters.confidence else [None] * len(images)
    return (table.append_column(PHASH, pa.array(phashes, pa.string()))
            .append_column(PROB, pa.array(probs, pa.float64()))
            .append_column(REASON, pa.nulls(table.num_rows, pa.string())))


@dataclass
class FilterReport:
    """The output's final status column and what the filters did, for _stats.json."""

    written: pa.Table  # id, status, error of every row, after filtering
    by_reason: dict[str, int] = field(default_factory=dict)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    candidates: int = 0  # rows with an image, the filters' input
    rewritten: list[str] = field(default_factory=list)

    @property
    def filtered(self) -> int:
        return sum(self.by_reason.values())


def threshold(conf: ConfidenceFilterSpec, classes: int) -> float:
    """The confidence a row's class needs: the spec's, else chance among the job's ``classes``
    (a job of 3 shapes judged by a 5-class classifier still needs more than 1/3)."""
    return conf.threshold if conf.threshold is not None else 1.0 / max(classes, 1)


def decide(ids: list[str], candidate: list[bool], sha: list[str | None], phash: list[str | None],
           prob: list[float | None], filters: FiltersSpec, classes: int = 0) -> list[str | None]:
    """Each row's filter reason, or None for a kept row (non-candidates: None). A pure function
    of the scores, in id order, so every rerun decides the same. ``classes``: how many the job's
    rows name, for the default confidence threshold."""
    reasons: list[str | None] = [None] * len(ids)
    limit = threshold(filters.confidence, classes) if filters.confidence else None
    first_by_sha: dict[str, str] = {}
    kept_hashes: list[int] = []
    kept_ids: list[str] = []
    for i in sorted(range(len(ids)), key=ids.__getitem__):
        if not candidate[i]:
            continue
        if limit is not None and (prob[i] is None or prob[i] <= limit):
            reasons[i] = f"{LOW_CONFIDENCE}: p={prob[i]:.3f} <= {limit:.3f}" if prob[i] is not None else \
                f"{LOW_CONFIDENCE}: no probability"
            continue
        if filters.exact_duplicates and sha[i] in first_by_sha:
            reasons[i] = f"{EXACT}: the same image as {first_by_sha[sha[i]]}"
            continue
        if filters.near_duplicate_distance is not None and phash[i] is not None:
            h = int(phash[i], 16)
            if kept_hashes:
                distances = np.bitwise_count(np.array(kept_hashes, np.uint64) ^ np.uint64(h))
                j = int(np.argmin(distances))
                if distances[j] <= filters.near_duplicate_distance:
                    reasons[i] = f"{NEAR}: phash {int(distances[j])} bit(s) from {kept_ids[j]}"
                    continue
            kept_hashes.append(h)
            kept_ids.append(ids[i])
        first_by_sha.setdefault(sha[i], ids[i])
    return reasons


def _read(fs, path: str, names: list[str]) -> pa.Table:
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
        f.seek(0)
        return pq.read_table(f, columns=[n for n in names if n in schema.names])


def apply(spec: JobSpec, files: list[str], log=print) -> FilterReport:
    """Decide over every shard of the output, rewrite the shards whose rows change, and report."""
    filters = spec.filters
    label = filters.confidence.label_column if filters.confidence else "label_name"
    fs, root = storage.filesystem(spec.output, spec.storage)
    wanted = ["id", "status", "error", "image_sha256", PHASH, PROB, REASON, label]
    tables = {name: _read(fs, f"{root}/{name}", wanted) for name in files}
    whole = pa.concat_tables(list(tables.values()), promote_options="permissive")
    status = whole.column("status").to_pylist()
    col = lambda name: whole.column(name).to_pylist() if name in whole.column_names else [None] * whole.num_rows  # noqa: E731
    # Rows with an image: a row a stage's safety checker filtered has none and stays as it is.
    candidate = [s in ("ok", FILTERED) and sha is not None for s, sha in zip(status, col("image_sha256"))]
    classes = len({name for name in col(label) if name is not None})
    reasons = decide(whole.column("id").to_pylist(), candidate, col("image_sha256"), col(PHASH), col(PROB), filters,
                     classes)
    new_status = [(FILTERED if r else "ok") if c else s for s, c, r in zip(status, candidate, reasons)]

    report = FilterReport(written=whole.select(["id", "error"]).add_column(1, "status", pa.array(new_status)),
                          candidates=sum(candidate))
    report.by_reason = dict(Counter(r.split(":", 1)[0] for r in reasons if r))
    if label in whole.column_names:
        for name, s in zip(col(label), new_status):
            counts = report.per_class.setdefault(str(name), {"ok": 0, FILTERED: 0, "error": 0})
            counts[s if s in counts else "error"] += 1

    start = 0
    for name, table in tables.items():
        part = slice(start, start + table.num_rows)
        start += table.num_rows
        if status[part] == new_status[part] and col(REASON)[part] == reasons[part]:
            continue
        path = f"{root}/{name}"
        with fs.open(path, "rb") as f:
            shard = pq.read_table(f)
        shard = shard.set_column(shard.schema.get_field_index("status"), "status", pa.array(new_status[part]))
        shard = shard.set_column(shard.schema.get_field_index(REASON), REASON, pa.array(reasons[part], pa.string()))
        ParquetWriter().publish(storage.join(spec.output, name), shard, spec.storage)
        report.rewritten.append(name)
    log(f"shardgen: filters: {report.filtered} of {report.candidates} rows filtered {report.by_reason}; "
        f"rewrote {len(report.rewritten)} of {len(files)} shard(s)")
    return report


def pass_rate(report: FilterReport) -> float | None:
    return round(1 - report.filtered / report.candidates, 4) if report.candidates else None


def duplicate_rate(report: FilterReport) -> float | None:
    dups = report.by_reason.get(EXACT, 0) + report.by_reason.get(NEAR, 0)
    return round(dups / report.candidates, 4) if report.candidates else None


def ok_count(report: FilterReport) -> int:
    return int(pc.sum(pc.equal(report.written.column("status"), "ok")).as_py() or 0)
