"""The bad-manifest corpus, each case through the real CLI entry point.

A manifest that cannot run is refused before any model loads (exit 2, the column or ids named).
Everything else is a row problem: the row comes back as an error row naming the field, the value
and the limit, the good rows of the same batches come back ok, and no row is lost. The exit code
follows max_error_fraction (0 within it, 3 over it).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.spec import parse_spec
from tests.helpers import png, read_output, run_cli, run_in_process, write_manifest


def blank_png(width: int, height: int) -> bytes:
    """A 1-bit blank image: a file of a few kB that decodes to width x height pixels."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def damaged(data: bytes, position: int) -> bytes:
    """``data`` with one byte zeroed: in a PNG, 11 truncates the IHDR chunk, 35 breaks the
    length of the first IDAT chunk (PIL raises ValueError and SyntaxError for them)."""
    return data[:position] + b"\x00" + data[position + 1:]


STEP = {"steps": 2, "batch_size": 4, "cpus_per_actor": 0.25}
GOOD = "a red circle on a white background"
LONG_OK = ("a small red circle on a large white background, " * 40)[:1500]  # over 77 tokens: truncated

# Per flow: (id, manifest columns, the error message's start, or None for an ok row). Good and
# bad rows sit side by side so that the batches of 4 mix them.
T2I_ROWS = [
    ("good-0", {"prompt": GOOD}, None),
    ("prompt-10k", {"prompt": "x" * 10_000}, "prompt: 10000 characters, over limits.max_prompt_chars 2000"),
    ("cjk-emoji", {"prompt": "猫の絵 🐱🎨 赤い丸"}, None),
    ("prompt-empty", {"prompt": ""}, "prompt: empty"),
    ("good-1", {"prompt": GOOD}, None),
    ("prompt-null", {"prompt": None}, "prompt: empty"),
    ("rtl", {"prompt": "دائرة حمراء على خلفية بيضاء"}, None),
    ("width-100000", {"prompt": GOOD, "width": 100_000}, "size: width 100000 is over limits.max_width 2048"),
    ("combining", {"prompt": "a re\u0301d\u0302 ci\u0303rcle\u0327"}, None),
    ("steps-100000", {"prompt": GOOD, "steps": 100_000}, "steps: 100000 is outside 1..200 (limits.max_steps)"),
    ("nul", {"prompt": "a red\x00circle"}, None),
    ("steps-0", {"prompt": GOOD, "steps": 0}, "steps: 0 is outside 1..200"),
    ("long-ok", {"prompt": LONG_OK}, None),
    ("width-0", {"prompt": GOOD, "width": 0}, "size: width 0 is not a positive multiple of 8"),
    ("negative-seed", {"prompt": GOOD, "seed": -12345}, None),
    ("width-36", {"prompt": GOOD, "width": 36}, "size: width 36 is not a positive multiple of 8"),
    ("good-2", {"prompt": GOOD}, None),
    ("pixels", {"prompt": GOOD, "width": 64, "height": 128},
     "size: 64x128 is 8192 pixels, over limits.max_pixels 4096"),
    ("negative-10k", {"prompt": GOOD, "negative_prompt": "y" * 10_000},
     "negative_prompt: 10000 characters, over limits.max_prompt_chars 2000"),
    ("guidance-inf", {"prompt": GOOD, "guidance_scale": math.inf}, "text_to_image: output is not finite"),
]
SR_ROWS = [
    ("sr-good", {"image": png((16, 16), seed=1)}, None),
    ("sr-corrupt", {"image": b"\x89PNG\r\n\x1a\n this is not a PNG"},
     "image: not a readable image (UnidentifiedImageError: no known image format)"),
    ("sr-truncated", {"image": png((16, 16), seed=2)[:200]},
     "image: not a readable image (OSError: image file is truncated"),
    ("sr-bad-ihdr", {"image": damaged(png((16, 16), seed=6), 11)}, "image: not a readable image (ValueError: "),
    ("sr-bad-chunk", {"image": damaged(png((16, 16), seed=7), 35)}, "image: not a readable image (SyntaxError: "),
    # 20000x20000 (a 49 kB file) trips PIL's own bomb guard; 3000x3000 the job's limits, from
    # the header, before any pixel is decoded.
    ("sr-bomb", {"image": blank_png(20_000, 20_000)}, "image: over limits.max_pixels 4096"),
    ("sr-huge", {"image": blank_png(3000, 3000)}, "image: width 3000 is over limits.max_width 2048"),
    ("sr-grows", {"image": png((32, 32), seed=3)},
     "image: super_resolution makes 128x128: 128x128 is 16384 pixels, over limits.max_pixels 4096"),
    ("sr-odd", {"image": png((12, 12), seed=4)}, "image: width 12 is not a positive multiple of 8"),
    ("sr-good-2", {"image": png((8, 16), seed=5)}, None),
]
INPAINT_ROWS = [
    ("in-good", {"prompt": GOOD, "image": png((32, 32), seed=6), "mask": png((32, 32), seed=7, mode="L")}, None),
    ("in-mask-size", {"prompt": GOOD, "image": png((32, 32), seed=8), "mask": png((16, 32), seed=9, mode="L")},
     "mask: size 16x32 differs from the image's 32x32"),
    ("in-mask-corrupt", {"prompt": GOOD, "image": png((32, 32), seed=10), "mask": b"GIF89a???"},
     "mask: not a readable image (UnidentifiedImageError: no known image format)"),
    ("in-mask-missing", {"prompt": GOOD, "image": png((32, 32), seed=11), "mask": None}, "mask: missing"),
    ("in-good-2", {"prompt": GOOD, "image": png((32, 32), seed=12), "mask": png((32, 32), seed=13, mode="L")}, None),
]
CASES = {row_id: expected for rows in (T2I_ROWS, SR_ROWS, INPAINT_ROWS) for row_id, _, expected in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local):
    """The mixed corpus in one job (three flows) with max_error_fraction above its error share."""
    tmp = tmp_path_factory.mktemp("corpus")
    schema = pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
                        ("negative_prompt", pa.string()), ("seed", pa.int64()), ("steps", pa.int64()),
                        ("width", pa.int64()), ("height", pa.int64()), ("guidance_scale", pa.float64()),
                        ("image", pa.binary()), ("mask", pa.binary())])
    rows = [{"id": row_id, "task": task, **cols}
            for task, table in (("t2i", T2I_ROWS), ("sr", SR_ROWS), ("inpaint", INPAINT_ROWS))
            for row_id, cols, _ in table]
    manifest = write_manifest(str(tmp / "manifest.parquet"), pa.Table.from_pylist(rows, schema=schema))
    errors = sum(expected is not None for expected in CASES.values())
    spec = {
        "manifest": manifest,
        "output": str(tmp / "out"),
        "flows": {
            "t2i": [{"kind": "text_to_image", "width": 32, "height": 32, **STEP}],
            "sr": [{"kind": "super_resolution", **STEP}],
            "inpaint": [{"kind": "inpainting", **STEP}],
        },
        "overrides": ["steps", "width", "height", "guidance_scale"],
        "limits": {"max_pixels": 64 * 64},
        "max_error_fraction": 0.7,
    }
    code, out, err = run_cli(tmp, spec)
    return {"code": code, "out": out, "err": err, "errors": errors, "rows": rows,
            "output": {r["id"]: r for r in read_output(str(tmp / "out")).to_pylist()}}


def test_no_row_is_lost(corpus):
    assert sorted(corpus["output"]) == sorted(r["id"] for r in corpus["rows"])
    assert f"{len(corpus['rows'])} rows ({len(corpus['rows']) - corpus['errors']} ok, {corpus['errors']} error)" \
        in corpus["out"]


@pytest.mark.parametrize("row_id", [row_id for row_id, expected in CASES.items() if expected is not None])
def test_bad_row_is_an_error_row_naming_the_field(corpus, row_id):
    row = corpus["output"][row_id]
    assert row["status"] == "error" and row["image"] is None
    assert row["error"].startswith(CASES[row_id]), row["error"]


def expected_size(task: str, cols: dict) -> tuple[int, int]:
    """(height, width) that a good row's image must have, from the manifest and the spec: its own
    width/height or the stage's 32x32; the input image's size, x4 through super-resolution."""
    if task == "t2i":
        return cols.get("height") or 32, cols.get("width") or 32
    height, width = np.asarray(Image.open(io.BytesIO(cols["image"]))).shape[:2]
    return (height * 4, width * 4) if task == "sr" else (height, width)


@pytest.mark.parametrize("row_id", [row_id for row_id, expected in CASES.items() if expected is None])
def test_good_rows_in_the_same_batches_are_ok(corpus, row_id):
    row = corpus["output"][row_id]
    assert row["status"] == "ok", row["error"]
    image = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
    source = next(r for r in corpus["rows"] if r["id"] == row_id)
    assert image.shape[:2] == expected_size(source["task"], source) and image.std() > 0


def test_prompts_come_back_unchanged(corpus):
    sent = {r["id"]: r["prompt"] for r in corpus["rows"] if r["task"] == "t2i"}
    for row_id in ("cjk-emoji", "rtl", "combining", "nul", "long-ok"):
        assert corpus["output"][row_id]["prompt"] == sent[row_id]
    assert corpus["output"]["negative-seed"]["seed"] == -12345


def test_within_max_error_fraction_exits_0_with_errors_by_kind(corpus):
    assert corpus["code"] == 0, corpus["err"]
    share = corpus["errors"] / len(corpus["rows"])
    assert f"error rows: {share:.1%} of rows, within max_error_fraction 0.7" in corpus["out"]
    assert "'prompt': 3" in corpus["out"] and "'image': 8" in corpus["out"]


def test_seed_beyond_int64_is_an_error_row(tmp_path):
    """An unsigned seed column can hold seeds that int64 cannot: that row is an error row, the
    others run (the job's steps, in this process; what an error row over max_error_fraction does to
    the exit code is the corpus's and test_exit_codes.py's)."""
    table = pa.table({"id": ["big", "ok", "max"], "prompt": [GOOD] * 3,
                      "seed": pa.array([2**64 - 1, 7, 2**63 - 1], pa.uint64())})
    manifest = write_manifest(str(tmp_path / "m.parquet"), table)
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"),
                       "stages": [{"kind": "text_to_image", "width": 32, "height": 32, **STEP}]})
    rows = {r["id"]: r for r in run_in_process(spec).to_pylist()}
    assert rows["big"]["status"] == "error" and rows["big"]["seed"] is None
    assert rows["big"]["error"] == f"seed: {2**64 - 1} is outside the int64 range"
    assert (rows["ok"]["status"], rows["ok"]["seed"]) == ("ok", 7)
    assert (rows["max"]["status"], rows["max"]["seed"]) == ("ok", 2**63 - 1)


# Manifests that cannot run, beyond the cases in test_validation.py: refused before any model
# loads, exit 2, the column named. (name, spec fields, manifest, expected words in the message)
REFUSED = [
    ("sr-without-image", {"stages": [{"kind": "super_resolution"}]}, [{"id": "a", "prompt": "p"}],
     ["lacks required column(s) ['image']"]),
    ("flows-without-task", {"flows": {"x": [{"kind": "text_to_image"}]}}, [{"id": "a", "prompt": "p"}],
     ["['task']"]),
    ("mask-as-int", {"stages": [{"kind": "inpainting"}]}, [{"id": "a", "prompt": "p", "image": b"x", "mask": 3}],
     ["'mask'", "bytes, struct{bytes, path} or URI string", "int64"]),
    ("width-as-float", {"overrides": ["width"]}, [{"id": "a", "prompt": "p", "width": 32.0}],
     ["'width'", "integer", "double"]),
    ("prompt-as-list", {}, [{"id": "a", "prompt": ["p"]}], ["'prompt'", "string"]),
    ("id-as-int", {}, [{"id": 1, "prompt": "p"}], ["'id'", "string", "int64"]),
    ("no-rows", {}, pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), ["no rows"]),
]


@pytest.mark.parametrize("name, fields, rows, words", REFUSED, ids=[c[0] for c in REFUSED])
def test_manifest_that_cannot_run_is_refused_before_models_load(tmp_path, monkeypatch, name, fields, rows, words):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SHARDGEN_CACHE", str(cache))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    code, _, err = run_cli(tmp_path, {"manifest": manifest, "output": str(tmp_path / "out"), **fields})
    assert code == 2, err
    assert all(w in err for w in words), err
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_duplicate_ids_across_manifest_files_are_refused(tmp_path):
    write_manifest(str(tmp_path / "m" / "part-0.parquet"), [{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "p"}])
    write_manifest(str(tmp_path / "m" / "part-1.parquet"), [{"id": "b", "prompt": "p"}])
    code, _, err = run_cli(tmp_path, {"manifest": str(tmp_path / "m"), "output": str(tmp_path / "out")})
    assert code == 2 and "1 duplicate id(s): 'b'" in err


def test_file_that_is_not_parquet_is_refused(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"id,prompt\na,p\n")
    code, _, err = run_cli(tmp_path, {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out")})
    assert code == 2 and "cannot read manifest" in err


@pytest.mark.parametrize("stage, words", [
    ({"kind": "text_to_image", "width": 100_000}, "stages.0: width 100000 is over limits.max_width 2048"),
    ({"kind": "text_to_image", "steps": 100_000}, "stages.0.steps: 100000 is over limits.max_steps 200"),
])
def test_stage_beyond_limits_is_refused(tmp_path, stage, words):
    write_manifest(str(tmp_path / "m.parquet"), [{"id": "a", "prompt": "p"}])
    code, _, err = run_cli(tmp_path, {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                                      "stages": [stage]})
    assert code == 2 and words in err, err
