"""Manifests from elsewhere: `shardgen manifest from` (text, CSV, JSONL; local and s3://), and
`columns:` for files with their own column names (a DiffusionDB-shaped manifest runs as it is)."""

from __future__ import annotations

import io
import json
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.manifest_from import row_id
from pipeline.spec import parse_spec
from tests.helpers import cli, run_cli, run_in_process, write_manifest

PROMPTS = "a red circle on a blue background\n\na green square on a white background\n" \
          "a red circle on a blue background\n"
FAST = {"steps": 2, "batch_size": 4, "cpus_per_actor": 0.5}


def read(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def test_text_file_of_prompts(tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    code, out, _ = cli("manifest", "from", str(tmp_path / "prompts.txt"))
    assert code == 0 and str(tmp_path / "prompts.parquet") in out
    table = read(str(tmp_path / "prompts.parquet"))
    assert table.column_names == ["id", "prompt"]
    assert table.column("prompt").to_pylist() == ["a red circle on a blue background",
                                                  "a green square on a white background",
                                                  "a red circle on a blue background"]
    ids = table.column("id").to_pylist()
    # From line number and content: the blank line 2 keeps its place, a repeated prompt gets its own id.
    assert ids[0] == row_id(1, json.dumps({"prompt": "a red circle on a blue background"}))
    assert ids[1].startswith("L000003-") and ids[2].startswith("L000004-")
    assert ids[0].split("-")[1] != ids[2].split("-")[1]  # the same prompt on another line hashes apart
    cli("manifest", "from", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "again.parquet"))
    assert read(str(tmp_path / "again.parquet")).column("id").to_pylist() == ids  # stable


def test_csv_keeps_its_columns_and_seeds(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,seed,label\na red circle,7,x\na blue square,,y\n")
    assert cli("manifest", "from", str(tmp_path / "p.csv"))[0] == 0
    table = read(str(tmp_path / "p.parquet"))
    assert table.column_names == ["id", "prompt", "seed", "label"]
    assert table.column("seed").to_pylist() == [7, None] and pa.types.is_integer(table.schema.field("seed").type)
    assert table.column("id").to_pylist()[1].startswith("L000003-")  # line 1 is the header


def test_jsonl_with_its_own_ids(tmp_path):
    lines = [{"id": 10, "prompt": "a red circle", "meta": "a"}, {"id": 11, "prompt": "a blue square", "meta": "b"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert cli("manifest", "from", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "m.parquet"))[0] == 0
    table = read(str(tmp_path / "m.parquet"))
    assert table.column("id").to_pylist() == ["10", "11"] and table.column("meta").to_pylist() == ["a", "b"]


def test_on_object_storage(bucket):
    storage.write_bytes(f"{bucket}/in/prompts.txt", PROMPTS.encode())
    assert cli("manifest", "from", f"{bucket}/in/prompts.txt")[0] == 0
    assert read(f"{bucket}/in/prompts.parquet").num_rows == 3


def test_missing_or_empty_file_is_refused(tmp_path):
    code, _, err = cli("manifest", "from", str(tmp_path / "nope.txt"))
    assert code == 2 and "no file at" in err
    (tmp_path / "empty.txt").write_text("\n\n")
    code, _, err = cli("manifest", "from", str(tmp_path / "empty.txt"))
    assert code == 2 and "has no rows" in err


def test_run_on_a_manifest_made_from_prompts(tmp_path):
    """The job's steps, in this process, on what `shardgen manifest from` made (test_examples.py
    runs the same through Ray for every example)."""
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    cli("manifest", "from", str(tmp_path / "prompts.txt"))
    spec = parse_spec({"manifest": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
                       "stages": [{"kind": "text_to_image", **FAST}]})
    rows = run_in_process(spec).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert sorted(r["id"] for r in rows) == sorted(read(str(tmp_path / "prompts.parquet")).column("id").to_pylist())


def diffusiondb(n: int) -> pa.Table:
    """DiffusionDB's metadata columns and types, ids in image_name."""
    return pa.table({
        "image_name": pa.array([f"{i:08x}-aef7-4225-a9e9-f516527408ac.png" for i in range(n)], pa.string()),
        "prompt": pa.array(["a red circle on a blue background", "a green square on a white background"][:n]),
        "part_id": pa.array([1] * n, pa.uint16()),
        "seed": pa.array([3312523387, 7][:n], pa.uint32()),
        "step": pa.array([2, 3][:n], pa.uint16()),
        "cfg": pa.array([4.0, 5.0][:n], pa.float32()),
        "sampler": pa.array([8, 8][:n], pa.uint8()),
        "width": pa.array([32, 32][:n], pa.uint16()),
        "height": pa.array([32, 40][:n], pa.uint16()),
        "user_name": pa.array(["c0f0e3d0", "7d1e8b2a"][:n]),
        "timestamp": pa.array([datetime(2022, 8, 20, 5, 30)] * n, pa.timestamp("us", tz="UTC")),
        "image_nsfw": pa.array([0.1] * n, pa.float32()),
    })


def test_diffusiondb_shaped_manifest_runs_with_a_columns_mapping(tmp_path):
    """The job's steps, in this process: the mapping renames, the overrides take the rows' sizes,
    and the pass-through columns keep the manifest's names."""
    manifest = write_manifest(str(tmp_path / "metadata.parquet"), diffusiondb(2))
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"),
                       "columns": {"id": "image_name", "steps": "step", "guidance_scale": "cfg"},
                       "overrides": ["width", "height"],  # DiffusionDB's sizes are the sizes its images were made at
                       "stages": [{"kind": "text_to_image", **FAST}]})
    table = run_in_process(spec)
    rows = {r["id"]: r for r in table.to_pylist()}
    first = rows["00000000-aef7-4225-a9e9-f516527408ac.png"]
    assert (first["status"], first["seed"], first["steps"], first["guidance_scale"]) == ("ok", 3312523387, 2, 4.0)
    second = rows["00000001-aef7-4225-a9e9-f516527408ac.png"]
    assert (second["steps"], second["guidance_scale"], second["width"], second["height"]) == (3, 5.0, 32, 40)
    # Pass-through columns keep the manifest's names; the mapped ones are named as shardgen does.
    names = table.column_names
    assert {"sampler", "user_name", "timestamp", "part_id", "image_nsfw"} <= set(names)
    assert not {"image_name", "step", "cfg"} & set(names)
    assert first["user_name"] == "c0f0e3d0"


@pytest.mark.parametrize("columns, words", [
    ({"id": "image_name", "steps": "steps_"}, "columns.steps: manifest"),
    ({"id": "image_name", "prompt": "part_id"}, "manifest column 'prompt' ('part_id' in the manifest) must be string"),
])
def test_bad_mapping_is_refused_naming_the_column(tmp_path, columns, words):
    manifest = write_manifest(str(tmp_path / "metadata.parquet"), diffusiondb(1))
    code, _, err = run_cli(tmp_path, {"manifest": manifest, "output": str(tmp_path / "out"), "columns": columns})
    assert code == 2 and words in err, err


def test_unmapped_foreign_manifest_says_how_to_map(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"key": "a", "caption": "a red circle"}])
    code, _, err = run_cli(tmp_path, {"manifest": manifest, "output": str(tmp_path / "out")})
    assert code == 2 and "lacks required column(s) ['id', 'prompt']" in err and "columns: {id: YOUR_COLUMN}" in err
