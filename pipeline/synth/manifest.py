"""`shardgen manifest synth`: classes x prompt templates x seeds -> a generation manifest.

N rows per class (balanced), each with a prompt from a random template whose slots are filled
from lists, a seed, a split, the label columns (`label` int, `label_name`, `class_text` and one
column per slot), and a per-row `guidance_scale` when asked. Rows are shuffled, so shards are not
class-sorted. Seeds are drawn without replacement, so no two rows share one: train, validation
and test can never share a (prompt, seed). Everything is a function of ``seed``.

The class names travel with the manifest as Parquet key/value metadata (LABELS_KEY); the dataset
card of the job's output declares `label` as a `class_label` with them (pipeline/card.py).
"""

from __future__ import annotations

import csv
import json
import string
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import storage
from pipeline.errors import SpecError

LABELS_KEY = b"shardgen:labels"
# Columns the builder writes itself; a slot may not take one of these names.
FIXED_COLUMNS = ("id", "prompt", "seed", "guidance_scale", "split", "label", "label_name", "class_text")
MAX_SEED = 2**31 - 1
DRAWS_PER_ROW = 1000  # tries to fill a template so that `distinct` slots differ


class ClassDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the class name: `label_name`, and what {class} says by default")
    synonyms: list[str] = Field(default=[], description="other words for the class; {class} takes the name or one "
                                "of these, drawn per row")
    description: str | None = Field(default=None, description="free text that a template may use as {description}")


class TemplateSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    templates: Annotated[list[str], Field(min_length=1)] = Field(
        description="prompt templates with slots: {class}, {description}, any slot of `slots`, and {a_NAME} for "
        "NAME with its article ('an orange')")
    slots: dict[str, Annotated[list[str], Field(min_length=1)]] = Field(
        default={}, description="the values each slot is filled from, drawn uniformly per row")
    distinct: list[list[str]] = Field(
        default=[], description="groups of slots that must take different values in one row (e.g. a shape's colour "
        "and its background)")

    @model_validator(mode="after")
    def _known_slots(self) -> "TemplateSet":
        known = {"class", "description", *self.slots}
        for name in self.slots:
            if name in FIXED_COLUMNS:
                raise ValueError(f"slots.{name}: the name of a column the builder writes itself ({FIXED_COLUMNS})")
        for i, template in enumerate(self.templates):
            for field in template_fields(template):
                if field.removeprefix("a_") not in known:
                    raise ValueError(f"templates.{i}: {template!r} has slot {{{field}}}, which neither `slots` nor "
                                     "{class}/{description} fill")
        for i, group in enumerate(self.distinct):
            unknown = [s for s in group if s not in self.slots]
            if unknown:
                raise ValueError(f"distinct.{i}: {unknown} are not slots")
        return self


def template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _load_structured(path: str, what: str):
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"no {what} file at {path}") from None
    if path.endswith(".json"):
        return json.loads(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"cannot parse {what} file {path}: {err}") from None


def _error(what: str, path: str, err: ValidationError) -> SpecError:
    lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors()]
    return SpecError(f"invalid {what} file {path}:\n" + "\n".join(lines))


def load_classes(path: str) -> list[ClassDef]:
    """Classes from YAML/JSON (a list of names or of {name, synonyms, description}, at the top or
    under `classes:`) or CSV (columns name, synonyms separated by '|', description)."""
    if path.endswith(".csv"):
        rows = list(csv.DictReader(storage.read_bytes(path).decode("utf-8").splitlines()))
        if rows and "name" not in rows[0]:
            raise SpecError(f"classes file {path}: needs a `name` column, has {list(rows[0])}")
        data = [{"name": r["name"], "synonyms": [s for s in (r.get("synonyms") or "").split("|") if s],
                 **({"description": r["description"]} if r.get("description") else {})} for r in rows]
    else:
        data = _load_structured(path, "classes")
        if isinstance(data, dict):
            data = data.get("classes")
    if not isinstance(data, list) or not data:
        raise SpecError(f"classes file {path}: expected a non-empty list of classes")
    try:
        classes = [ClassDef.model_validate({"name": c} if isinstance(c, str) else c) for c in data]
    except ValidationError as err:
        raise _error("classes", path, err) from None
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise SpecError(f"classes file {path}: class names repeat: {names}")
    return classes


def load_templates(path: str) -> TemplateSet:
    """Templates from YAML/JSON (`templates`, `slots`, `distinct`) or a text file, one template per line."""
    if path.endswith(".txt"):
        data = {"templates": [t for t in storage.read_bytes(path).decode("utf-8").splitlines() if t.strip()]}
    else:
        data = _load_structured(path, "templates")
    try:
        return TemplateSet.model_validate(data)
    except ValidationError as err:
        raise _error("templates", path, err) from None


def parse_splits(text: str) -> dict[str, float]:
    """'train=0.8,validation=0.1,test=0.1' -> fractions (summing to 1)."""
    splits = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            splits[name.strip()] = float(value)
        except ValueError:
            raise SpecError(f"--splits: {part!r} is not NAME=FRACTION") from None
    if any(not n.replace("_", "").replace("-", "").isalnum() for n in splits) or any(v < 0 for v in splits.values()):
        raise SpecError(f"--splits: names must be letters, digits, '-' or '_', fractions >= 0: {text!r}")
    if abs(sum(splits.values()) - 1.0) > 1e-6:
        raise SpecError(f"--splits: fractions sum to {sum(splits.values()):g}, not 1")
    return splits


def _split_counts(n: int, splits: dict[str, float]) -> dict[str, int]:
    """Largest remainder: the counts add up to n and each is within 1 of n * fraction."""
    exact = {k: n * v for k, v in splits.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _fill(rng: np.random.Generator, cls: ClassDef, templates: TemplateSet) -> tuple[str, str, dict[str, str]]:
    for _ in range(DRAWS_PER_ROW):
        values = {name: options[rng.integers(len(options))] for name, options in templates.slots.items()}
        if all(len({values[s] for s in group}) == len(group) for group in templates.distinct):
            break
    else:
        raise SpecError(f"templates: cannot fill the `distinct` slots {templates.distinct} with different values")
    words = [cls.name, *cls.synonyms]
    class_text = words[rng.integers(len(words))]
    filled = {"class": class_text, "description": cls.description or class_text, **values}
    filled.update({f"a_{k}": _article(v) for k, v in list(filled.items())})
    template = templates.templates[rng.integers(len(templates.templates))]
    return template.format_map(filled), class_text, values


def build(classes: list[ClassDef], templates: TemplateSet, per_class: int, seed: int, splits: dict[str, float],
          guidance: list[float] | None = None, guidance_range: tuple[float, float] | None = None,
          id_prefix: str = "synth") -> pa.Table:
    """The manifest as a table (see the module's docstring)."""
    if per_class < 1:
        raise SpecError(f"--per-class must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed)
    rows = []
    for label, cls in enumerate(classes):
        order = rng.permutation(per_class)  # which of the class's rows goes to which split and guidance
        split_of = [name for name, count in _split_counts(per_class, splits).items() for _ in range(count)]
        for j in range(per_class):
            prompt, class_text, values = _fill(rng, cls, templates)
            row = {"prompt": prompt, "split": split_of[order[j]], "label": label, "label_name": cls.name,
                   "class_text": class_text, **values}
            if guidance:
                row["guidance_scale"] = float(guidance[order[j] % len(guidance)])
            elif guidance_range:
                row["guidance_scale"] = float(rng.uniform(*guidance_range))
            rows.append(row)
    seeds = rng.choice(MAX_SEED, size=len(rows), replace=False)
    shuffled = rng.permutation(len(rows))
    records = [{"id": f"{id_prefix}-{i:06d}", "seed": int(seeds[i]), **rows[k]} for i, k in enumerate(shuffled)]
    table = pa.Table.from_pylist(records)
    table = table.set_column(table.schema.get_field_index("label"), "label", table.column("label").cast(pa.int64()))
    return table.replace_schema_metadata({LABELS_KEY: json.dumps([c.name for c in classes]).encode()})


def write(table: pa.Table, uri: str) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue().to_pybytes())


def label_names(schema: pa.Schema) -> list[str] | None:
    """The class names a manifest (or an output shard) carries, or None."""
    raw = (schema.metadata or {}).get(LABELS_KEY)
    return json.loads(raw) if raw else None


def parse_guidance(values: str | None, value_range: str | None
                   ) -> tuple[list[float] | None, tuple[float, float] | None]:
    if values and value_range:
        raise SpecError("give --guidance (a list) or --guidance-range (a:b), not both")
    try:
        if values:
            return [float(v) for v in values.split(",")], None
        if value_range:
            low, high = (float(v) for v in value_range.split(":"))
            return None, (low, high)
    except ValueError:
        raise SpecError(f"--guidance {values!r} / --guidance-range {value_range!r}: "
                        "expected 1.5,2,4 or 1.5:7.5") from None
    return None, None


def main(classes: str, templates: str, per_class: int, seed: int, splits: str, output: str,
         guidance: str | None = None, guidance_range: str | None = None) -> pa.Table:
    values, value_range = parse_guidance(guidance, guidance_range)
    table = build(load_classes(classes), load_templates(templates), per_class, seed, parse_splits(splits),
                  values, value_range)
    write(table, output)
    return table
