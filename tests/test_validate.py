"""`shardgen validate`: the checks of a run without generating, then the plan.

On every manifest that `run` refuses (the bad-manifest corpus) it exits 2 with the same message,
without building or loading a model; on a good spec it prints the plan and exits 0.
"""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest

from pipeline.errors import SpecError
from pipeline.models.resolve import resolve
from pipeline.plan import check_fits, fit_resources
from pipeline.spec import parse_spec
from tests.helpers import png, prompts_manifest, run_cli, write_manifest
from tests.test_bad_manifests import REFUSED


@pytest.fixture(autouse=True)
def local_ray(monkeypatch):
    """Validate as for a local run, whatever `ray start` left on this machine."""
    monkeypatch.setenv("RAY_ADDRESS", "local")


# test_validation.py's cases and the corpus's, as (name, spec fields, manifest rows).
CASES = [(name, fields, rows) for name, fields, rows, _ in REFUSED] + [
    ("no-prompt-column", {}, [{"id": "a", "caption": "x"}]),
    ("duplicate-ids", {}, [{"id": i, "prompt": "p"} for i in ("a", "b", "a")]),
    ("seed-as-string", {}, [{"id": "a", "prompt": "p", "seed": "x"}]),
    ("null-id", {}, [{"id": "a", "prompt": "p"}, {"id": None, "prompt": "q"}]),
    ("mapped-column-missing", {"columns": {"id": "image_name"}}, [{"id": "a", "prompt": "p"}]),
]


@pytest.mark.parametrize("name, fields, rows", CASES, ids=[c[0] for c in CASES])
def test_refuses_each_bad_manifest_as_run_does_without_a_model(tmp_path, monkeypatch, name, fields, rows):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SHARDGEN_CACHE", str(cache))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    # A random-weight built-in would be built into the cache if the checks got as far as models.
    spec = {"manifest": manifest, "output": str(tmp_path / "out"), **fields}
    if "flows" not in spec:
        spec.setdefault("stages", [{"kind": "text_to_image", "model": "builtin:tiny-sd"}])
    validated = run_cli(tmp_path, spec, command="validate")
    ran = run_cli(tmp_path, spec, command="run")
    assert validated[0] == ran[0] == 2, validated
    assert validated[2] == ran[2] and validated[2].startswith("shardgen: error: ")
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_good_spec_prints_the_plan_and_exits_0(tmp_path):
    rows = prompts_manifest(5)
    rows[1]["steps"] = 100_000
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{**r, "steps": r.get("steps")} for r in rows])
    spec = {"manifest": manifest, "output": str(tmp_path / "out"), "format": {"rows_per_shard": 2},
            "overrides": ["steps"],
            "stages": [{"kind": "text_to_image"}, {"kind": "super_resolution", "batch_size": 4}]}
    code, out, err = run_cli(tmp_path, spec, command="validate")
    assert code == 0, err
    assert "5 rows" in out and "output " + str(tmp_path / "out") + ": new" in out
    assert "0. text_to_image: builtin:shapes-t2i, 20 steps, guidance 4 (recommended), 32x32 (recommended)" in out
    assert "1. super_resolution: builtin:shapes-sr" in out and "batches of 4" in out
    assert "1 of the first 5 rows would be error rows {'steps': 1}: 'row-001': steps: 100000 is outside" in out
    assert f"a run writes 5 rows in 3 shard(s) of 2 rows to {tmp_path / 'out'} (the last may hold fewer" in out
    assert not (tmp_path / "out").exists()


def test_shows_the_columns_mapping_and_tiny_model_warning(tmp_path):
    table = pa.table({"image_name": ["a.png", "b.png"], "caption": ["a red circle", "a blue square"],
                      "sampler": [1, 2]})
    manifest = write_manifest(str(tmp_path / "m.parquet"), table)
    spec = {"manifest": manifest, "output": str(tmp_path / "out"), "columns": {"id": "image_name", "prompt": "caption"},
            "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "cpus_per_actor": 0.5}]}
    code, out, err = run_cli(tmp_path, spec, command="validate")
    assert code == 0, err
    assert "mapped: image_name -> id, caption -> prompt; passed through: sampler" in out
    assert out.count("builtin:tiny-sd has random weights and draw(s) noise") == 1
    assert "1 actor(s) x 0.5 CPU" in out


def test_refuses_stages_that_cannot_fit_the_machine(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(1))
    spec = {"manifest": manifest, "output": str(tmp_path / "out"),
            "stages": [{"kind": "text_to_image", "cpus_per_actor": 64}]}
    code, _, err = run_cli(tmp_path, spec, command="validate")
    assert code == 2 and "the stages' minimum actors need 64.25 CPUs" in err, err


def test_samples_images_of_an_image_flow(tmp_path):
    rows = [{"id": "ok", "image": png((16, 16))}, {"id": "odd", "image": png((12, 12))}]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    spec = {"manifest": manifest, "output": str(tmp_path / "out"), "stages": [{"kind": "super_resolution"}]}
    code, out, err = run_cli(tmp_path, spec, command="validate")
    assert code == 0, err
    assert "'odd': image: width 12 is not a positive multiple of 8" in out


@pytest.mark.parametrize("cpus, gpus, shares", [
    (2, 0, [(0.87, 0.0), (0.87, 0.0)]),  # a 2-CPU laptop: both stages and the CPU steps fit
    (16, 0, [(7.0, 0.0), (7.0, 0.0)]),
    (8, 2, [(1.0, 1.0), (1.0, 1.0)]),  # with GPUs: as before, a GPU and a CPU each
])
def test_unset_resources_fit_the_cluster(cpus, gpus, shares):
    spec = parse_spec({"manifest": "m", "output": "o", "stages": [{"kind": "text_to_image"},
                                                                   {"kind": "super_resolution"}]})
    fitted = fit_resources(spec, cpus, gpus, cpus)
    assert [(s.cpus_per_actor, s.gpus_per_actor) for s in fitted.stages] == shares
    check_fits(fitted, cpus, gpus)
    assert spec.stages[0].fits_cpus and not fitted.stages[0].fits_cpus  # the spec itself is left as written


def test_gpu_stages_get_fixed_pools_over_their_share_of_the_gpus():
    spec = parse_spec({"manifest": "m", "output": "o", "stages": [
        {"kind": "text_to_image"}, {"kind": "super_resolution"}, {"kind": "inpainting", "actors": [1, 3]}]})
    fitted = fit_resources(spec, 32, 8, 16)
    # 8 GPUs, 3 of them for the pool that set its size: 2 each for the others, fixed.
    assert [s.actors for s in fitted.stages] == [(2, 2), (2, 2), (1, 3)]
    halves = parse_spec({"manifest": "m", "output": "o", "stages": [{"kind": "text_to_image", "gpus_per_actor": 0.5}]})
    assert fit_resources(halves, 8, 2, 8).stages[0].actors == (4, 4)
    assert fit_resources(spec, 4, 0, 4).stages[0].actors == (1, 1)  # no GPUs: the spec's default pool
    # A stage kept on CPUs takes no share of the GPUs, pooled or not.
    cpu_beside = parse_spec({"manifest": "m", "output": "o", "stages": [
        {"kind": "text_to_image"}, {"kind": "super_resolution", "gpus_per_actor": 0, "actors": 2},
        {"kind": "inpainting", "gpus_per_actor": 0}]})
    assert [s.actors for s in fit_resources(cpu_beside, 32, 4, 16).stages] == [(4, 4), (2, 2), (1, 1)]


def test_explicit_resources_are_taken_as_written():
    spec = parse_spec({"manifest": "m", "output": "o", "stages": [
        {"kind": "text_to_image", "cpus_per_actor": 1, "actors": 2}, {"kind": "super_resolution"}]})
    fitted = fit_resources(spec, 4, 0, 4)
    assert [s.cpus_per_actor for s in fitted.stages] == [1, 1.0]  # 4 - 0.25 - 2 leaves 1.75: 1 whole CPU
    with pytest.raises(SpecError, match="need 2.26 CPUs and 0 GPUs .* the cluster has 2 CPUs"):
        check_fits(fit_resources(spec, 2, 0, 2), 2, 0)


def test_validate_on_a_finished_output_and_on_another_specs_output(synthetic_output, tmp_path):
    """On the output a spec finished: exit 0, saying a rerun does nothing; the same output under a
    spec that differs in a row field: exit 2 with run's message, and nothing written."""
    output = tmp_path / "out"
    shutil.copytree(synthetic_output.output, output)
    spec = {**json.loads((output / "_job.json").read_text())["spec"], "output": str(output)}
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    code, out, err = run_cli(tmp_path, spec, command="validate")
    assert code == 0, err
    assert f"finished by run {json.loads((output / '_stats.json').read_text())['run_id']}: a rerun does nothing" in out
    spec["stages"][0]["steps"] += 1
    code, _, err = run_cli(tmp_path, spec, command="validate")
    assert code == 2 and "holds a run of another spec (changed: stages.0.steps (4 -> 5))" in err, err
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before


def test_validate_refuses_a_pickle_only_model_as_run_does(tmp_path):
    from tests.test_security import _pickled

    folder = _pickled(resolve("builtin:tiny-sd"), tmp_path / "pickled")
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(2))
    spec = {"manifest": manifest, "output": str(tmp_path / "out"),
            "stages": [{"kind": "text_to_image", "model": str(folder)}]}
    code, _, err = run_cli(tmp_path, spec, command="validate")
    assert code == 2 and f"model: {folder} holds weights only as pickles" in err, err
    assert (code, err) == run_cli(tmp_path, spec)[::2]  # run refuses it with the same code and message
    assert not (tmp_path / "out").exists()
