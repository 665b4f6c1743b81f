"""A finished job exits 0 when its error rows are within max_error_fraction, else 3."""

import pytest

from pipeline.job import exit_code, summary_line
from pipeline.spec import parse_spec


def stats(rows: int, error: int) -> dict:
    return {"rows": rows, "ok": rows - error, "error": error, "elapsed_s": 1.0, "images_per_s": 1.0,
            "errors_by_kind": {"prompt": error} if error else {}}


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
