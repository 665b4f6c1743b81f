"""A cluster address where nothing listens fails the run before any Ray starts (exit 1), naming the
address, where it came from, and RAY_ADDRESS=local: whether it is RAY_ADDRESS or the address a
stopped `ray start` left behind (Ray's temp folder's ray_current_cluster). Ray is never started:
the check comes first, and here ray.init raises if called at all."""

from __future__ import annotations

import pytest

from pipeline.errors import EXIT_FAILED
from tests.helpers import as_a_fresh_process, free_port, prompts_manifest, run_cli, write_manifest


@pytest.fixture
def no_ray_init(monkeypatch):
    as_a_fresh_process(monkeypatch)


def _run(tmp_path) -> tuple[int, str, str]:
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(1))
    return run_cli(tmp_path, {"manifest": manifest, "output": str(tmp_path / "out")})


def test_a_dead_ray_address_fails_before_ray_starts(tmp_path, monkeypatch, no_ray_init):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    code, _, err = _run(tmp_path)
    assert code == EXIT_FAILED, err
    assert f"shardgen: error: no Ray cluster answers at {address} (RAY_ADDRESS)" in err
    assert "RAY_ADDRESS=local" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_stale_ray_current_cluster_fails_naming_it(tmp_path, monkeypatch, no_ray_init):
    """A `ray start` that was stopped leaves its address in TMPDIR/ray/ray_current_cluster: a run
    without RAY_ADDRESS would join it (Ray reads the file), and must say where it came from."""
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))  # Ray's temp folder, here: not the machine's
    (tmp_path / "tmp" / "ray").mkdir(parents=True)
    (tmp_path / "tmp" / "ray" / "ray_current_cluster").write_text(address)
    code, _, err = _run(tmp_path)
    assert code == EXIT_FAILED, err
    assert (f"shardgen: error: no Ray cluster answers at {address} "
            "(the address a `ray start` on this machine recorded)") in err, err
    assert "RAY_ADDRESS=local" in err
    assert not (tmp_path / "out").exists()


TIMED_OUT = "The current node timed out during startup. This could happen because some of the raylet failed"


@pytest.mark.parametrize("address, tries", [("local", 2), (None, 2), ("10.0.0.9:6379", 1)])
def test_only_a_local_start_that_times_out_is_made_again(monkeypatch, capsys, address, tries):
    """Ray's fixed 30 s for a new local node can pass on a busy machine: that start is made again,
    saying so; a cluster that does not answer in time is an error at once. (ray.init stands in:
    the time-out cannot be caused on purpose.)"""
    import ray

    from pipeline import cluster

    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        if len(calls) == 1:
            raise Exception(TIMED_OUT)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    if tries == 1:
        with pytest.raises(Exception, match="timed out during startup"):
            cluster.connect(address, verbose=True)
        assert calls == [address]
    else:
        cluster.connect(address, verbose=True)
        assert calls == [address, "shutdown", address]
        assert "did not start in time (try 1 of 3)" in capsys.readouterr().err
