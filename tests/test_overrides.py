"""Per-row overrides are opt-in: a manifest column sets a generation parameter only when the spec
says so (`overrides:` or a `columns:` entry); every other column passes through, under
`source_NAME` where the output has a column NAME of its own."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pyarrow as pa
import pytest
import yaml

from pipeline import manifest
from pipeline.access import for_job
from pipeline.cli import main
from pipeline.errors import ManifestError
from pipeline.prepare import prepare_batch
from pipeline.spec import parse_spec
from tests.helpers import write_manifest

LAION_COLUMNS = {"id": "key", "prompt": "caption"}


def laion(n: int = 3) -> pa.Table:
    """LAION metadata's columns: the photos' own sizes in width and height."""
    return pa.table({
        "key": [f"{i:09d}" for i in range(n)],
        "caption": ["a red circle on a blue background", "a green square on a white background",
                    "a yellow triangle on a black background"][:n],
        "url": [f"https://example.com/{i}.jpg" for i in range(n)],
        "width": pa.array([640, 480, 1024][:n], pa.int64()),
        "height": pa.array([480, 512, 768][:n], pa.int64()),
        "similarity": [0.31, 0.29, 0.35][:n],
        "status": ["success"] * n,  # img2dataset's download status: the output has a `status` of its own
    })


def _spec(tmp_path, **fields):
    path = write_manifest(str(tmp_path / "laion.parquet"), laion())
    return parse_spec({"manifest": path, "output": str(tmp_path / "out"), "columns": LAION_COLUMNS,
                       "stages": [{"kind": "text_to_image", "cpus_per_actor": 0.5}], **fields})


def _prepared(spec) -> pa.Table:
    return prepare_batch(manifest.read(spec), spec.stages, spec.storage, for_job(spec), spec.limits)


def test_laion_manifest_runs_at_the_stage_size_and_keeps_the_source_sizes(tmp_path):
    spec = _spec(tmp_path)
    manifest.check(spec)
    table = _prepared(spec)
    assert table.column("status").to_pylist() == ["ok"] * 3
    assert table.column("width").to_pylist() == table.column("height").to_pylist() == [32, 32, 32]
    assert table.column("source_width").to_pylist() == [640, 480, 1024]
    assert table.column("source_height").to_pylist() == [480, 512, 768]
    assert table.column("source_status").to_pylist() == ["success"] * 3
    assert table.column("url").to_pylist()[0] == "https://example.com/0.jpg"


def test_overrides_listed_in_the_spec_set_the_row_size(tmp_path):
    spec = _spec(tmp_path, overrides=["width", "height"], limits={"max_width": 1024, "max_height": 1024})
    table = _prepared(spec)
    assert table.column("width").to_pylist() == [640, 480, 1024]
    assert table.column("height").to_pylist() == [480, 512, 768]
    assert "source_width" not in table.column_names


def test_an_override_the_manifest_lacks_is_refused(tmp_path):
    with pytest.raises(ManifestError, match="overrides: manifest .* has no column 'steps'"):
        manifest.check(_spec(tmp_path, overrides=["steps"]))


def test_a_source_name_taken_twice_is_refused(tmp_path):
    path = write_manifest(str(tmp_path / "m.parquet"), laion().append_column("source_width", pa.array([1, 2, 3])))
    spec = parse_spec({"manifest": path, "output": str(tmp_path / "out"), "columns": LAION_COLUMNS})
    with pytest.raises(ManifestError, match="'width' and 'source_width' would both be 'source_width'"):
        manifest.check(spec)


def test_validate_says_which_columns_override_and_which_pass_through(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"manifest": write_manifest(str(tmp_path / "m.parquet"), laion()),
                                    "output": str(tmp_path / "out"), "columns": LAION_COLUMNS,
                                    "stages": [{"kind": "text_to_image", "cpus_per_actor": 0.5}]}))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["validate", "--spec", str(path)])
    out = out.getvalue()
    assert code == 0, err.getvalue()
    assert ("passed through: url, width (as source_width), height (as source_height), similarity, "
            "status (as source_status); per-row overrides: none (every row runs at its stage's settings)") in out
    assert "32x32 (recommended)" in out and "0 of the first 3 rows would be error rows" in out
