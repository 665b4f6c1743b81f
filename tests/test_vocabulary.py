"""The trained built-ins say what they know: prompts outside their vocabulary are one warning line
per job (run and validate), and the demo never asks for what they cannot show."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import yaml

from pipeline import demo, vocabulary
from pipeline.cli import main
from pipeline.spec import parse_spec
from pipeline.training.captions import phrase
from tests.helpers import write_manifest

PROMPTS = ["a pink circle on a blue background", "a red circle on a blue background", "a cat on a sofa",
           "green circles on red", ""]


@pytest.mark.parametrize("prompt, outside", [
    ("a pink circle on a blue background", True),  # a colour the models never saw
    ("a red star", True),  # a shape they never saw
    ("a sunset over the sea", True),  # nothing they know
    ("a red circle on a blue background", False),
    ("green circles on red", False),
    ("a drawing of a triangle", False),
])
def test_prompts_outside_the_vocabulary(prompt, outside):
    assert vocabulary.outside(prompt) is outside


def _spec(tmp_path, model="builtin:shapes-t2i"):
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    return {"manifest": manifest, "output": str(tmp_path / "out"),
            "stages": [{"kind": "text_to_image", "model": model, "cpus_per_actor": 0.5}]}


def test_one_warning_line_with_the_count_and_the_vocabulary(tmp_path):
    line = vocabulary.warning(parse_spec(_spec(tmp_path)))
    assert line.startswith("shardgen: warning: 2 of 4 prompts name no colour or shape that builtin:shapes-t2i")
    assert "'a pink circle on a blue background'" in line
    assert "Known colours: red, green, blue, yellow, orange, purple, white, black" in line
    assert "shapes: circle, square, triangle, diamond, cross" in line and "\n" not in line


def test_no_warning_for_other_models(tmp_path):
    assert vocabulary.warning(parse_spec(_spec(tmp_path, "builtin:tiny-sd"))) is None


def test_validate_says_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path)))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["validate", "--spec", str(path)])
    assert code == 0, err.getvalue()
    assert out.getvalue().count("2 of 4 prompts name no colour or shape") == 1


def test_demo_never_asks_for_a_shape_in_its_background_colour(tmp_path):
    rows = 400
    for i, prompt in enumerate(demo.sample_prompts(rows)):
        colour, shape, background = demo.caption(i)
        assert colour != background and background in prompt.split(), prompt  # the background is named
        if i % 4 == 3:  # repainted: the drawn scene's background stays
            assert demo.inpaint_request(i)[0] != background, (i, demo.inpaint_request(i), background)
    assert phrase(demo.PHRASINGS[2], "circle", "white", "blue") == "a drawing of a white circle on a blue background"
    assert vocabulary.warning(demo.demo_spec(tmp_path, rows)) is None
