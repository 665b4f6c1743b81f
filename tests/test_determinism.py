"""An image depends on its row and model only: not on batch size, actor count or order."""

import pytest

from pipeline.job import run_job
from tests.conftest import prompts_manifest, read_output, small_spec, write_manifest


def images_by_id(output: str) -> dict[str, bytes]:
    return {r["id"]: r["image"]["bytes"] for r in read_output(output).to_pylist()}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    rows = prompts_manifest(6)
    rows[1]["prompt"] = "a blue square on a black background"
    rows[4]["negative_prompt"] = "red"
    folder = tmp_path_factory.mktemp("det") / "manifest"
    # A folder of two files: the manifest may be a folder, and the rows come in several blocks.
    write_manifest(str(folder / "part-0.parquet"), rows[:3])
    write_manifest(str(folder / "part-1.parquet"), rows[3:])
    return str(folder)


def test_same_images_across_batch_sizes_and_actor_counts(manifest, tmp_path, ray_local):
    runs = {}
    for batch_size, actors in [(1, 1), (4, 1), (4, 2)]:
        out = str(tmp_path / f"b{batch_size}-a{actors}")
        # Half a CPU per actor lets two actors and the CPU steps share this 2-CPU test cluster.
        run_job(small_spec(manifest, out, batch_size=batch_size, actors=actors, cpus_per_actor=0.5))
        runs[(batch_size, actors)] = images_by_id(out)
    reference = runs[(1, 1)]
    assert len(reference) == 6 and all(reference.values())
    assert len(set(reference.values())) == 6  # different rows, different images
    for key, images in runs.items():
        assert images == reference, f"images differ for batch_size, actors = {key}"
