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


def test_limits_bound_the_stages():
    big = {"kind": "text_to_image", "width": 4096, "height": 4096}
    with pytest.raises(SpecError, match=r"stages\.0: width 4096 is over limits\.max_width 2048"):
        parse_spec({**BASE, "stages": [big]})
    raised = {"max_width": 4096, "max_height": 4096, "max_pixels": 4096 * 4096}
    assert parse_spec({**BASE, "stages": [big], "limits": raised}).stages[0].width == 4096
    with pytest.raises(SpecError, match=r"stages\.0: 2048x2048 is 4194304 pixels, over limits\.max_pixels 1000000"):
        parse_spec({**BASE, "stages": [{**big, "width": 2048, "height": 2048}], "limits": {"max_pixels": 10**6}})


def test_limits_follow_a_cascade_through_super_resolution():
    flow = [{"kind": "text_to_image", "width": 1024, "height": 512}, {"kind": "super_resolution"}]
    with pytest.raises(SpecError, match=r"flows\.big: super_resolution makes 4096x2048: width 4096 is over "
                                        r"limits\.max_width 2048"):
        parse_spec({**BASE, "flows": {"small": flow[1:], "big": flow}})


@pytest.mark.parametrize("fields, where", [
    ({"limits": {"max_steps": 0}}, "limits.max_steps"),
    ({"limits": {"max_prompt_chars": -1}}, "limits.max_prompt_chars"),
    ({"limits": {"max_sides": 8}}, "limits.max_sides"),
    ({"max_error_fraction": 1.5}, "max_error_fraction"),
])
def test_bad_limits_are_named(fields, where):
    with pytest.raises(SpecError, match=where.replace(".", r"\.")):
        parse_spec({**BASE, **fields})


def test_defaults_of_every_field():
    """Every field a minimal spec leaves out, with its default (the stage's model, which follows
    its kind, is test_model_default_follows_kind's)."""
    data = parse_spec(BASE).model_dump(mode="json")
    data["stages"][0].pop("model")
    assert data == {
        "manifest": "m.parquet", "output": "out",
        "storage": {"endpoint_url": None, "key": None, "secret": None, "token": None, "region": None, "anon": False,
                    "allowed_prefixes": [], "max_attempts": 10, "retry_mode": "standard"},
        "stages": [{"kind": "text_to_image", "scheduler": None, "steps": 20, "guidance_scale": 7.5, "width": 64,
                    "height": 64, "strength": 0.75, "noise_level": 20, "batch_size": 8, "actors": [1, 1],
                    "gpus_per_actor": None, "cpus_per_actor": 1.0, "dtype": "auto", "batch_invariant": None}],
        "flows": None,
        "format": {"image": "png", "quality": 95, "rows_per_shard": 1000},
        "limits": {"max_width": 2048, "max_height": 2048, "max_pixels": 4194304, "max_steps": 200,
                   "max_prompt_chars": 2000},
        "max_error_fraction": 0.0,
    }
