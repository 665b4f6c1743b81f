import re
from pathlib import Path

import pytest

from pipeline.errors import SpecError
from pipeline.spec import json_schema, parse_spec, parse_spec_text

BASE = {"manifest": "m.parquet", "output": "out"}
REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def test_defaults_fill_every_field():
    spec = parse_spec(BASE)
    stage = spec.stages[0]
    assert (stage.kind, stage.model, stage.actors, stage.gpus_per_actor, stage.fits_cpus) == (
        "text_to_image", "builtin:shapes-t2i", (1, 1), None, True)
    assert spec.format.image == "png" and spec.format.rows_per_shard == 1000 and spec.columns == {}


def test_model_default_is_the_trained_built_in_of_its_kind():
    kinds = ["text_to_image", "super_resolution", "inpainting", "image_to_image"]
    spec = parse_spec({**BASE, "flows": {k: [{"kind": k}] for k in kinds}})
    assert [spec.flows[k][0].model for k in kinds] == [
        "builtin:shapes-t2i", "builtin:shapes-sr", "builtin:shapes-inpaint", "builtin:shapes-t2i"]
    assert not any(s.draws_noise for s in spec.all_stages())


def test_recommended_settings_fill_only_unset_fields_of_the_built_in():
    spec = parse_spec({**BASE, "stages": [{"kind": "text_to_image", "width": 48},
                                          {"kind": "super_resolution", "guidance_scale": 2}]})
    t2i, sr = spec.stages
    assert (t2i.guidance_scale, t2i.width, t2i.height) == (4.0, 48, 32)
    assert t2i.recommended == {"guidance_scale": 4.0, "height": 32}
    assert (sr.guidance_scale, sr.noise_level, sr.recommended) == (2.0, 20, {"noise_level": 20})
    inpaint = parse_spec({**BASE, "stages": [{"kind": "inpainting"}]}).stages[0]
    assert inpaint.recommended == {"guidance_scale": 4.0, "strength": 1.0}  # repaint the whole mask from noise
    # Any other model keeps the plain defaults, and says it draws noise when it is a tiny built-in.
    tiny = parse_spec({**BASE, "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd"}]}).stages[0]
    assert (tiny.guidance_scale, tiny.width, tiny.recommended, tiny.draws_noise) == (7.5, 64, {}, True)
    other = parse_spec({**BASE, "stages": [{"kind": "text_to_image", "model": "/models/sd"}]}).stages[0]
    assert (other.guidance_scale, other.width, other.draws_noise) == (7.5, 64, False)


def test_columns_map_shardgen_names_to_the_manifest_s():
    spec = parse_spec({**BASE, "columns": {"id": "image_name", "guidance_scale": "cfg"}})
    assert spec.columns == {"id": "image_name", "guidance_scale": "cfg"}
    with pytest.raises(SpecError, match=r"columns\.idd"):
        parse_spec({**BASE, "columns": {"idd": "image_name"}})
    with pytest.raises(SpecError, match=r"'x'\] are mapped to more than one name"):
        parse_spec({**BASE, "columns": {"prompt": "x", "negative_prompt": "x"}})


def test_int_actors_means_fixed_pool():
    assert parse_spec({**BASE, "stages": [{"kind": "text_to_image", "actors": 3}]}).stages[0].actors == (3, 3)


@pytest.mark.parametrize("stage, where", [
    ({"kind": "text_to_image", "stepz": 3}, "stages.0.stepz"),
    ({"kind": "text_to_img"}, "stages.0.kind"),
    ({"kind": "text_to_image", "width": 60}, "stages.0.width"),
    ({"kind": "text_to_image", "actors": [3, 1]}, "stages.0.actors"),
    ({"kind": "text_to_image", "batch_size": "max"}, "stages.0.batch_size"),
    ({"kind": "text_to_image", "compile": "everything"}, "stages.0.compile"),
    ({"kind": "text_to_image", "cache": {"method": "first_block", "threshold": 2}}, "stages.0.cache.threshold"),
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


def _properties(schema: dict) -> set[str]:
    names = set()
    for model in [schema, *schema.get("$defs", {}).values()]:
        names.update(model.get("properties", {}))
    return names


def test_schema_has_every_field_of_every_model_with_its_description():
    schema = json_schema()
    assert {"StageSpec", "StorageSpec", "FormatSpec", "LimitsSpec"} <= set(schema["$defs"])
    assert schema["$schema"].startswith("https://json-schema.org/")
    stage = schema["$defs"]["StageSpec"]["properties"]
    assert "trained built-in" in stage["model"]["description"]
    assert {"manifest", "output", "columns", "stages", "flows", "storage", "format", "limits"} <= _properties(schema)
    for model in [schema, *schema["$defs"].values()]:
        assert all(p.get("description") for p in model["properties"].values()), model.get("title")


def test_spec_reference_names_every_schema_field():
    text = REFERENCE.read_text()
    section = text[text.index("### The job spec"):]
    section = section[:section.index("\n### ", 1)]
    missing = sorted(n for n in _properties(json_schema()) if not re.search(rf"\b{n}\b", section))
    assert not missing, f"the reference's spec section lacks {missing}"


def test_defaults_of_every_field():
    """Every field a minimal spec leaves out, with its default (the stage's model, which follows
    its kind, is test_model_default_follows_kind's; with it come the trained built-in's recommended
    guidance and size)."""
    data = parse_spec(BASE).model_dump(mode="json")
    data["stages"][0].pop("model")
    assert data == {
        "manifest": "m.parquet", "output": "out", "columns": {}, "overrides": [],
        "storage": {"endpoint_url": None, "key": None, "secret": None, "token": None, "region": None, "anon": False,
                    "allowed_prefixes": [], "max_attempts": 10, "retry_mode": "standard"},
        "stages": [{"kind": "text_to_image", "revision": None, "variant": None, "scheduler": None, "steps": 20,
                    "guidance_scale": 4.0, "width": 32, "height": 32, "strength": 0.75, "noise_level": 20,
                    "batch_size": "auto", "actors": [1, 1], "gpus_per_actor": None, "cpus_per_actor": 1.0,
                    "dtype": "auto", "batch_invariant": None, "offload": "none", "quantize": "none",
                    "safety_checker": "off", "compile": False, "attention_backend": None, "cache": None,
                    "true_cfg_scale": None,
                    "max_sequence_length": None, "loras": [], "controlnet": [], "controlnet_scale": 1.0,
                    "control_mode": [], "control_start": 0.0, "control_end": 1.0, "control": None, "t2i_adapter": None,
                    "ip_adapter": None, "ip_adapter_weight_name": None, "ip_adapter_scale": 1.0}],
        "flows": None,
        "format": {"image": "png", "quality": 95, "rows_per_shard": 1000, "publish_every_minutes": 4.0,
                   "png_compress_level": 1},
        "limits": {"max_width": 2048, "max_height": 2048, "max_pixels": 4194304, "max_steps": 200,
                   "max_prompt_chars": 2000},
        "filters": None,
        "max_error_fraction": 0.0,
    }


def test_a_kind_without_a_trained_builtin_needs_a_model():
    """No stage falls back to a model that draws noise: unconditional has no trained built-in."""
    with pytest.raises(SpecError, match=r"stages\.0.*unconditional stage needs a model"):
        parse_spec({**BASE, "stages": [{"kind": "unconditional"}]})
    named = parse_spec({**BASE, "stages": [{"kind": "unconditional", "model": "org/ddpm"}]})
    assert named.stages[0].model == "org/ddpm"
