import pytest

from pipeline.errors import SpecError
from pipeline.spec import parse_spec, parse_spec_text

BASE = {"manifest": "m.parquet", "output": "out"}


def test_defaults_fill_every_field():
    spec = parse_spec(BASE)
    stage = spec.stages[0]
    assert (stage.kind, stage.model, stage.actors, stage.gpus_per_actor) == (
        "text_to_image", "builtin:tiny-sd", (1, 1), None)
    assert spec.format.image == "png" and spec.format.rows_per_shard == 1000


def test_model_default_follows_kind():
    spec = parse_spec({**BASE, "stages": [{"kind": "text_to_image"}, {"kind": "super_resolution"}]})
    assert [s.model for s in spec.stages] == ["builtin:tiny-sd", "builtin:tiny-upscaler"]


def test_int_actors_means_fixed_pool():
    assert parse_spec({**BASE, "stages": [{"kind": "text_to_image", "actors": 3}]}).stages[0].actors == (3, 3)


@pytest.mark.parametrize("stage, where", [
    ({"kind": "text_to_image", "stepz": 3}, "stages.0.stepz"),
    ({"kind": "text_to_img"}, "stages.0.kind"),
    ({"kind": "text_to_image", "width": 60}, "stages.0.width"),
    ({"kind": "text_to_image", "actors": [3, 1]}, "stages.0.actors"),
])
def test_bad_fields_are_named(stage, where):
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, "stages": [stage]})
    assert where in str(err.value)


def test_unknown_top_level_field():
    with pytest.raises(SpecError, match="outptu"):
        parse_spec({**BASE, "outptu": "x"})


def test_overrides_win_and_yaml_parses():
    spec = parse_spec_text("manifest: a.parquet\noutput: b\n", "spec.yaml", output="c")
    assert (spec.manifest, spec.output) == ("a.parquet", "c")


def test_public_dict_has_no_secrets():
    spec = parse_spec({**BASE, "storage": {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value"}})
    text = str(spec.public_dict())
    assert "s3cr3t-value" not in text and "AKIAEXAMPLE" not in text
