"""A manifest that cannot run stops before any model loads (exit 2, the column or ids named);
a row-level problem becomes one error row while the others succeed."""

import yaml

from pipeline.cli import main
from tests.helpers import prompts_manifest, run_in_process, small_spec, write_manifest


def run_cli(tmp_path, rows, capsys):
    manifest = write_manifest(str(tmp_path / "manifest.parquet"), rows)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"manifest": manifest, "output": str(tmp_path / "out")}))
    code = main(["run", "--spec", str(spec)])
    return code, capsys.readouterr().err


def test_missing_prompt_column_fails_before_models_load(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SHARDGEN_CACHE", str(cache))
    code, err = run_cli(tmp_path, [{"id": "a", "caption": "x"}], capsys)
    assert code == 2
    assert "'prompt'" in err
    assert not cache.exists()  # no model was built or loaded
    assert not (tmp_path / "out").exists()


def test_duplicate_ids_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHARDGEN_CACHE", str(tmp_path / "cache"))
    rows = [{"id": i, "prompt": "p"} for i in ("a", "b", "a", "c", "c")]
    code, err = run_cli(tmp_path, rows, capsys)
    assert code == 2
    assert "2 duplicate id(s)" in err and "'a'" in err and "'c'" in err
    assert not (tmp_path / "cache").exists()


def test_wrong_column_type_is_named(tmp_path, capsys):
    code, err = run_cli(tmp_path, [{"id": "a", "prompt": "p", "seed": "not-a-number"}], capsys)
    assert code == 2 and "'seed'" in err and "integer" in err


def test_null_id_is_refused(tmp_path, capsys):
    code, err = run_cli(tmp_path, [{"id": "a", "prompt": "p"}, {"id": None, "prompt": "q"}], capsys)
    assert code == 2 and "manifest column 'id' has 1 null value(s)" in err


def test_empty_prompt_is_one_error_row(tmp_path):
    """The job's steps, in this process: the row is an error row, the others are not held back."""
    rows = prompts_manifest(4)
    rows[2]["prompt"] = "   "
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = {r["id"]: r for r in run_in_process(small_spec(manifest, str(tmp_path / "out"))).to_pylist()}
    assert sorted(out) == [r["id"] for r in rows]
    bad = out["row-002"]
    assert bad["status"] == "error" and bad["error"] == "prompt: empty" and bad["image"] is None
    assert all(out[i]["status"] == "ok" and out[i]["error"] is None for i in ("row-000", "row-001", "row-003"))
