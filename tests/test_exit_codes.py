"""Exit codes: a finished job exits 0 when its error rows are within max_error_fraction, else 3;
a rerun with another spec exits 2 (a cluster that does not answer: tests/test_cluster_address.py)."""

import pytest

from pipeline.job import exit_code, summary_line
from pipeline.spec import parse_spec
from pipeline.stats import Stats
from tests.helpers import prompts_manifest, run_cli, write_manifest


def stats(rows: int, error: int) -> Stats:
    return Stats(run_id="r", runs=["r"], rows=rows, ok=rows - error, error=error,
                 errors_by_kind={"prompt": error} if error else {}, shards=1, rows_this_run=rows, elapsed_s=1.0,
                 images_per_s=1.0)


@pytest.mark.parametrize("fraction, error, code", [
    (None, 0, 0),  # the default, 0: any error row fails the job
    (None, 1, 3),
    (0.1, 1, 0),  # exactly at the fraction is within it
    (0.1, 2, 3),
    (1.0, 10, 0),
])
def test_exit_code_follows_max_error_fraction(fraction, error, code):
    fields = {} if fraction is None else {"max_error_fraction": fraction}
    spec = parse_spec({"manifest": "m", "output": "o", **fields})
    assert exit_code(spec, stats(10, error)) == code


def test_summary_says_which_side_of_the_fraction():
    spec = parse_spec({"manifest": "m", "output": "o", "max_error_fraction": 0.25})
    assert "error rows: 20.0% of rows, within max_error_fraction 0.25" in summary_line(spec, stats(10, 2))
    assert "error rows: 30.0% of rows, over max_error_fraction 0.25" in summary_line(spec, stats(10, 3))
    assert "error rows" not in summary_line(spec, stats(10, 0))


def test_rerun_of_a_finished_output_with_another_spec_exits_2(tmp_path, ray_local):
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(2))
    spec = {"manifest": manifest, "output": str(tmp_path / "out"),
            "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 2, "width": 32, "height": 32}]}
    code, out, _ = run_cli(tmp_path, spec)
    assert code == 0
    # A random-weight model runs when named, and says once that it draws noise.
    assert out.count("builtin:tiny-sd has random weights and draw(s) noise") == 1
    # The same spec again: finished, nothing to do. Resources may change; the model may not.
    spec["stages"][0]["cpus_per_actor"] = 0.5
    code, out, _ = run_cli(tmp_path, spec)
    assert code == 0 and "already complete" in out
    spec["stages"][0].update(model="builtin:shapes-t2i", steps=3)
    code, _, err = run_cli(tmp_path, spec)
    assert code == 2, err
    assert 'changed: stages.0.model ("builtin:tiny-sd" -> "builtin:shapes-t2i"); stages.0.steps (2 -> 3)' in err
    assert "--overwrite" in err
    assert (tmp_path / "out" / "_SUCCESS").exists()  # the finished output is left as it was
