"""`shardgen verify`: passes on a whole output, and catches each kind of damage on its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli, storage


@pytest.fixture
def copy(synthetic_output, tmp_path) -> Path:
    """A copy of the synthetic output to damage."""
    shutil.copytree(synthetic_output.output, tmp_path / "out")
    return tmp_path / "out"


def verify(capsys, output, *flags) -> tuple[int, list | str]:
    code = cli.main(["verify", str(output), *flags])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code else out)


def failed_checks(failures: list) -> set[str]:
    return {f["check"] for f in failures}


def shards(output: Path) -> list[Path]:
    return sorted((output / "data").glob("*.parquet"))


def rewrite(shard: Path, change) -> None:
    """Rewrite one shard with ``change(table)`` applied, keeping its schema metadata and row groups."""
    table = pq.read_table(shard)
    pq.write_table(change(table), shard, row_group_size=100)


def set_value(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))


def test_a_whole_output_passes(synthetic_output, capsys):
    code, line = verify(capsys, synthetic_output.output, "--manifest", synthetic_output.manifest, "--deep")
    assert code == 0, line
    assert line.strip() == (f"shardgen verify: {synthetic_output.output}: ok: 4 shard(s), 260 rows, "
                            f"{synthetic_output.ok} image(s) read; checked success, footers, schema, huggingface, "
                            "counts, ids, manifest, status, deep")
    code, line = verify(capsys, synthetic_output.output, "--deep", "--sample", "20", "--seed", "3")
    assert code == 0 and "20 image(s) read" in line and "deep (sample of 20, seed 3)" in line


def test_missing_shard(copy, synthetic_output, capsys):
    gone = shards(copy)[0]
    lost = pq.read_table(gone, columns=["id"]).column("id").to_pylist()
    gone.unlink()
    code, failures = verify(capsys, copy, "--manifest", synthetic_output.manifest)
    assert code == 1 and failed_checks(failures) == {"stats", "success", "manifest"}
    [missing] = [f for f in failures if f["check"] == "manifest" and "not in the output" in f["message"]]
    assert missing["message"].startswith(f"{len(lost)} manifest id(s)") and missing["examples"] == sorted(lost)[:10]


def test_duplicated_id(copy, capsys):
    first, second = shards(copy)[:2]
    twin = pq.read_table(first, columns=["id"]).column("id")[5].as_py()
    rewrite(second, lambda t: set_value(t, "id", 0, twin))
    code, failures = verify(capsys, copy)
    assert code == 1 and failed_checks(failures) == {"ids"}
    assert failures[0]["examples"] == [f"{twin} x2"]


def test_corrupted_image_byte(copy, capsys):
    shard = shards(copy)[0]
    table = pq.read_table(shard, columns=["id", "image"])
    row = next(i for i, s in enumerate(table.column("image").to_pylist()) if s["bytes"])
    image = table.column("image")[row]["bytes"].as_py()
    data = bytearray(shard.read_bytes())
    at = data.find(image[1000:1064]) + 10  # one byte of this image's pixels, as stored in the file
    assert at > 10 and data.count(image[1000:1064]) == 1
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify(capsys, copy)[0] == 0  # without --deep no image byte is read
    code, failures = verify(capsys, copy, "--deep")
    assert code == 1 and failed_checks(failures) == {"images"}
    [example] = failures[0]["examples"]
    assert example.startswith(f"{table.column('id')[row].as_py()}: sha256 ")


def test_wrong_sha256(copy, capsys):
    shard = shards(copy)[1]
    ids = pq.read_table(shard, columns=["id"]).column("id")
    rewrite(shard, lambda t: set_value(t, "image_sha256", 1, "0" * 64))
    code, failures = verify(capsys, copy, "--deep")
    assert code == 1 and failed_checks(failures) == {"images"}
    assert failures[0]["examples"] == [f"{ids[1].as_py()}: sha256 "
                                       f"{failures[0]['examples'][0].split('sha256 ')[1].split()[0]} "
                                       f"is not image_sha256 {'0' * 64}"]


def test_missing_success(copy, capsys):
    (copy / "_SUCCESS").unlink()
    code, failures = verify(capsys, copy)
    assert code == 1 and failures == [{"check": "success", "message": "no _SUCCESS: the run did not finish",
                                       "examples": []}]


def test_status_that_disagrees_with_the_image(copy, capsys):
    shard = shards(copy)[0]
    table = pq.read_table(shard, columns=["id", "status"])
    row = table.column("status").to_pylist().index("ok")
    rewrite(shard, lambda t: set_value(t, "status", row, "error"))
    code, failures = verify(capsys, copy)
    assert code == 1 and failed_checks(failures) == {"status"}
    per_row, per_group = failures
    assert per_row["examples"] == [f"{table.column('id')[row].as_py()}: status error"]
    assert per_group["examples"] == [f"data/{shard.name} row group 0: 10 null image(s), 11 row(s) not ok"]


def test_unreadable_footer_and_foreign_schema(copy, capsys):
    first, second = shards(copy)[:2]
    first.write_bytes(first.read_bytes()[:-100])
    rewrite(second, lambda t: t.drop_columns(["task"]).replace_schema_metadata(None))
    code, failures = verify(capsys, copy)
    assert code == 1
    by_check = {f["check"]: f for f in failures}
    assert by_check["footers"]["examples"][0].startswith(f"data/{first.name}: ")
    assert by_check["schema"]["examples"][0].startswith(f"data/{second.name}: ")
    assert by_check["huggingface"]["examples"] == [f"data/{second.name}"]


def test_verify_on_s3(synthetic_output, bucket, capsys):
    fs, _ = storage.filesystem(bucket)
    fs.put(synthetic_output.output + "/", f"{bucket.removeprefix('s3://')}/out/", recursive=True)
    manifest = f"{bucket}/manifest.parquet"
    storage.write_bytes(manifest, Path(synthetic_output.manifest).read_bytes())
    code, line = verify(capsys, f"{bucket}/out", "--manifest", manifest, "--deep", "--sample", "10")
    assert code == 0, line
    fs.rm(f"{bucket.removeprefix('s3://')}/out/_SUCCESS")
    code, failures = verify(capsys, f"{bucket}/out")
    assert code == 1 and failed_checks(failures) == {"success"}


def test_no_shards(tmp_path, capsys):
    code, failures = verify(capsys, tmp_path)
    assert code == 1 and failed_checks(failures) == {"success", "shards"}


def test_counts_compare_with_stats(copy, capsys):
    stats = json.loads((copy / "_stats.json").read_text())
    stats["rows"] += 1
    (copy / "_stats.json").write_text(json.dumps(stats))
    code, failures = verify(capsys, copy)
    assert code == 1 and failures[0]["message"] == "_stats.json counts 261 rows, the shards hold 260"


def test_success_must_count_the_rows(copy, capsys):
    (copy / "_SUCCESS").write_text(json.dumps({"rows": 261}))
    code, failures = verify(capsys, copy)
    assert code == 1 and failures == [{"check": "success", "message": "_SUCCESS counts 261 rows, the shards hold 260",
                                       "examples": []}]
    (copy / "_SUCCESS").write_text("done")
    code, failures = verify(capsys, copy)
    assert code == 1 and [f["message"] for f in failures] == ["_SUCCESS does not say how many rows the output holds"]


def test_ids_the_manifest_lacks_are_named(copy, synthetic_output, tmp_path, capsys):
    """An output id that the manifest does not have, and a manifest id the output lacks, each named."""
    manifest = pq.read_table(synthetic_output.manifest)
    dropped = manifest.column("id")[7].as_py()
    other = pa.concat_tables([manifest.slice(0, 7), manifest.slice(8),
                              pa.table({"id": ["not-in-output"], "prompt": ["p"]}).cast(manifest.schema)])
    pq.write_table(other, tmp_path / "other.parquet")
    code, failures = verify(capsys, copy, "--manifest", str(tmp_path / "other.parquet"))
    assert code == 1 and failed_checks(failures) == {"manifest"}
    assert [(f["message"], f["examples"]) for f in failures] == [
        ("1 manifest id(s) not in the output", ["not-in-output"]),
        ("1 output id(s) not in the manifest", [dropped])]


def test_deep_decodes_every_image_and_checks_its_size(copy, capsys):
    """An image whose sha256 is right but that does not decode, and one that decodes to another
    size than its row's width x height: only --deep, which decodes, finds them."""
    import hashlib

    shard = shards(copy)[2]
    table = pq.read_table(shard, columns=["id", "image", "status"])
    ok = [i for i, s in enumerate(table.column("status").to_pylist()) if s == "ok"]
    broken_row, resized_row = ok[:2]
    broken = table.column("image")[broken_row]["bytes"].as_py()[:-40]  # the last IDAT bytes and IEND cut

    def damage(t: pa.Table) -> pa.Table:
        images = t.column("image").to_pylist()
        images[broken_row] = {**images[broken_row], "bytes": broken}
        t = t.set_column(t.column_names.index("image"), "image", pa.array(images, t.schema.field("image").type))
        t = set_value(t, "image_sha256", broken_row, hashlib.sha256(broken).hexdigest())
        return set_value(t, "width", resized_row, 33)

    rewrite(shard, damage)
    assert verify(capsys, copy)[0] == 0  # without --deep no image byte is read
    code, failures = verify(capsys, copy, "--deep")
    assert code == 1 and failed_checks(failures) == {"images"}
    ids = table.column("id").to_pylist()
    examples = sorted(failures[0]["examples"])
    assert examples[0].startswith(f"{ids[broken_row]}: does not decode: ") or \
        examples[1].startswith(f"{ids[broken_row]}: does not decode: "), examples
    assert f"{ids[resized_row]}: decodes to 32x32, the row says 33x32" in examples


def test_a_leftover_hidden_file_passes_verify_but_not_the_suites_exactly_once_check(copy, synthetic_output, capsys):
    """A killed write's temporary dot-file: pyarrow and verify pass over hidden names, so the
    check every faulted or resumed run in the suite makes lists data/ itself."""
    from tests.helpers import assert_finished_exactly_once

    assert_finished_exactly_once(str(copy), synthetic_output.manifest)
    (copy / "data" / ".part-x.parquet.tmp-7").write_bytes(b"partial")
    assert verify(capsys, copy, "--manifest", synthetic_output.manifest)[0] == 0
    with pytest.raises(AssertionError, match="data/ holds files that are not shards"):
        assert_finished_exactly_once(str(copy), synthetic_output.manifest)
