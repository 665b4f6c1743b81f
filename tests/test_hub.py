"""Models named by a Hugging Face Hub id, served by a stand-in Hub on 127.0.0.1 (tests/hub_server.py,
reached through HF_ENDPOINT; no other network).

The repository ``shardgen-test/tiny-sd`` is gated and holds builtin:tiny-sd as diffusers saves it,
plus what a real repository often holds beside it and shardgen must not download: fp16 variant
weights, a pickled copy of the unet, a single-file checkpoint at the root and a README. A job runs
through a real Ray of its own (in a subprocess, which reads HF_* from its environment as a
cluster's nodes do) and downloads (its token set); the job's steps then run offline, in this
process, from the cache it left.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from pipeline.errors import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from pipeline.models.hub import select
from pipeline.models.resolve import COMPLETE_MARKER, build_builtin, resolve
from pipeline.spec import load_spec_file
from tests.helpers import prompts_manifest, read_output, run_in_process, write_manifest
from tests.hub_server import HubServer, Repo
from tests.test_security import REPO, RUNNER

MODEL = "shardgen-test/tiny-sd"
PICKLED = "shardgen-test/pickled"
CUSTOM = "shardgen-test/custom-code"
COMMIT = hashlib.sha1(b"shardgen-test/tiny-sd").hexdigest()
TOKEN = "hf_PLANTED" + secrets.token_hex(8)
WEIGHTS = ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model")


@pytest.fixture(scope="module")
def tiny_files(environment) -> tuple[Path, set[str]]:
    """builtin:tiny-sd and its files: all that a pipeline needs, so exactly what must be downloaded."""
    folder = build_builtin("tiny-sd")
    return folder, {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER}


@pytest.fixture(scope="module")
def hub(tiny_files, tmp_path_factory):
    tiny, _ = tiny_files
    root = tmp_path_factory.mktemp("hub-repos")
    full = root / "tiny-sd"
    shutil.copytree(tiny, full, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    for stem in WEIGHTS:
        weights = load_file(full / f"{stem}.safetensors")
        half = {k: v.half() for k, v in weights.items()}
        save_file(half, full / f"{stem}.fp16.safetensors", metadata={"format": "pt"})
    torch.save(load_file(full / "unet/diffusion_pytorch_model.safetensors"), full / "unet/diffusion_pytorch_model.bin")
    shutil.copy(full / "unet/diffusion_pytorch_model.safetensors", full / "tiny-sd.safetensors")
    (full / "README.md").write_text("# tiny-sd\n")
    pickled = root / "pickled"
    shutil.copytree(tiny, pickled, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    for weights in pickled.rglob("*.safetensors"):
        torch.save(load_file(weights), weights.with_suffix(".bin"))
        weights.unlink()
    custom = root / "custom-code"  # safetensors weights, and a Python file beside them
    shutil.copytree(tiny, custom, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    (custom / "pipeline.py").write_text("raise SystemExit('code from a model folder ran')\n")
    repos = {MODEL: Repo(full, COMMIT, gated=True), PICKLED: Repo(pickled, hashlib.sha1(b"pickled").hexdigest()),
             CUSTOM: Repo(custom, hashlib.sha1(b"custom").hexdigest())}
    with HubServer(repos, token=TOKEN) as server:
        yield server


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """The Hub's address, no token, online, and a model cache of this test's own."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("SHARDGEN_CACHE", str(tmp_path / "cache"))
    hub.requests.clear()
    return hub


def _spec(tmp_path: Path, stages: list[dict], rows: int = 2) -> Path:
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(rows))
    spec_file = tmp_path / "spec.yaml"
    stages = [{"steps": 2, "width": 32, "height": 32, "cpus_per_actor": 0.75, **s} for s in stages]
    spec_file.write_text(yaml.safe_dump({"manifest": manifest, "output": str(tmp_path / "out"), "stages": stages}))
    return spec_file


def _refused(tmp_path: Path, capsys, **stage) -> str:
    """Run a one-stage job in this process; it must be refused (exit 2) before anything runs."""
    code = main(["run", "--spec", str(_spec(tmp_path, [{"kind": "text_to_image", **stage}]))])
    err = capsys.readouterr().err
    assert code == EXIT_INVALID, err
    assert not (tmp_path / "out").exists()
    return err


def _downloads(hub: HubServer, repo: str = MODEL) -> dict[str, int]:
    return dict(hub.gets(repo))


# -- refused on the driver ------------------------------------------------------------------------


def test_missing_repo_is_refused_naming_it(hub_env, tmp_path, capsys):
    err = _refused(tmp_path, capsys, model="shardgen-test/no-such-model")
    assert "model: shardgen-test/no-such-model is neither a local folder nor a model on the Hugging Face Hub" in err
    assert hub_env.requests[("GET", "shardgen-test/no-such-model", "/api/info")] == 1


@pytest.mark.parametrize("token, status", [(None, "HF_TOKEN is not set"), ("hf_not_the_right_one", "HF_TOKEN is set")])
def test_gated_repo_without_a_valid_token_is_refused(hub_env, tmp_path, capsys, monkeypatch, token, status):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    err = _refused(tmp_path, capsys, model=MODEL, revision=COMMIT)
    assert f"model: {MODEL} is gated on the Hugging Face Hub" in err and status in err
    assert not _downloads(hub_env)  # the listing was read, no file came


def test_unknown_revision_is_refused(hub_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    err = _refused(tmp_path, capsys, model=MODEL, revision="v9")
    assert f"revision: 'v9' is not a branch, tag or commit of {MODEL}" in err


def test_unreachable_hub_is_exit_1(hub_env, tmp_path, capsys, monkeypatch):
    from tests.helpers import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = main(["run", "--spec", str(_spec(tmp_path, [{"kind": "text_to_image", "model": MODEL}]))])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED and f"model: cannot reach the Hugging Face Hub for {MODEL}" in err
    assert TOKEN not in err


def test_pickle_only_repo_is_refused_without_downloading_weights(hub_env, tmp_path, capsys):
    err = _refused(tmp_path, capsys, model=PICKLED)
    assert f"model: {PICKLED} holds weights only as pickles" in err and "unet/diffusion_pytorch_model.bin" in err
    assert _downloads(hub_env, PICKLED) == {"model_index.json": 1}


def test_repo_with_python_code_is_refused_without_downloading_it(hub_env, tmp_path, capsys):
    err = _refused(tmp_path, capsys, model=CUSTOM)
    assert f"model: {CUSTOM} ships Python code (pipeline.py); shardgen runs no code from model folders" in err
    assert _downloads(hub_env, CUSTOM) == {"model_index.json": 1}


def test_unknown_variant_is_refused_naming_it(hub_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    err = _refused(tmp_path, capsys, model=MODEL, variant="bf16")
    assert f"variant: {MODEL} has no safetensors weights of the variant 'bf16'" in err
    assert _downloads(hub_env) == {"model_index.json": 1}


def test_a_download_never_takes_python_files():
    """Whatever a repository lists, the files fetched are the pipeline's configs and weights."""
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "PNDMScheduler"]}
    files = ["model_index.json", "handler.py", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/modeling_unet.py", "scheduler/scheduler_config.json", "scheduler/__init__.py"]
    assert select(files, index, None) == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                          "unet/diffusion_pytorch_model.safetensors"]


def test_revision_and_variant_are_for_hub_ids_only(hub_env, tmp_path, capsys):
    err = _refused(tmp_path, capsys, model="builtin:tiny-sd", variant="fp16")
    assert "variant: only a hub id (org/name) has revisions and variants, not the model builtin:tiny-sd" in err


def test_uncached_hub_id_offline_is_refused(hub_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(tmp_path, capsys, model=MODEL, revision=COMMIT)
    assert f"model: {MODEL} (revision {COMMIT}) is not in the model cache" in err and "HF_HUB_OFFLINE" in err
    assert not hub_env.requests


# -- what is downloaded ---------------------------------------------------------------------------


def test_variant_downloads_only_its_weights_and_loads_as_a_plain_folder(hub_env, tiny_files, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _, needed = tiny_files
    folder = resolve(MODEL, variant="fp16")

    fetched = {f.replace(".fp16.", ".") for f in _downloads(hub_env)}
    assert fetched == needed and set(_downloads(hub_env).values()) == {1}
    assert {f"{stem}.fp16.safetensors" for stem in WEIGHTS} <= set(_downloads(hub_env))
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == needed | {COMPLETE_MARKER}
    with safe_open(folder / "unet/diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)

    # A branch is looked up again (one small request), its files are not downloaded again.
    hub_env.requests.clear()
    assert resolve(MODEL, variant="fp16") == folder
    assert not _downloads(hub_env) and sum(hub_env.requests.values()) == 1


def test_cached_commit_makes_no_request(hub_env, monkeypatch):
    """A commit never changes: once cached, loading it again asks the Hub nothing (not even online)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = resolve(MODEL, revision=COMMIT)
    hub_env.requests.clear()
    assert resolve(MODEL, revision=COMMIT) == folder
    assert not hub_env.requests


# -- jobs through Ray -----------------------------------------------------------------------------


def _run_job(tmp_path: Path, stages: list[dict], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``shardgen run`` on a Ray of its own, with ``env`` on top of this process's environment."""
    spec_file = _spec(tmp_path, stages, rows=3)
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env = {**base, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0", **env}
    # Ray's socket paths must stay short: its temp folder goes under /tmp, not pytest's tmp_path.
    ray_dir = Path(tempfile.mkdtemp(prefix="sg-hub-", dir="/tmp"))
    try:
        done = subprocess.run([sys.executable, "-c", RUNNER, str(ray_dir), str(spec_file)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=540)
        done.logs = {str(p): p.read_bytes() for p in ray_dir.rglob("*") if p.is_file() and not p.is_symlink()}
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def downloaded(hub, tmp_path_factory):
    """A job of two stages, both on the gated hub model (one pinned to its commit, one on main), so
    that two actors race for the same download on this node, with the token set."""
    work = tmp_path_factory.mktemp("hub-job")
    cache = work / "cache"
    hub.requests.clear()
    stages = [{"kind": "text_to_image", "model": MODEL, "revision": COMMIT},
              {"kind": "image_to_image", "model": MODEL, "revision": "main"}]
    # The weights come only once both actors looked the model up (after the driver's two checks),
    # so that the second actor arrives while the first one downloads.
    hub.hold_weights_until_infos = 4
    try:
        done = _run_job(work, stages, {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "SHARDGEN_CACHE": str(cache)})
    finally:
        hub.hold_weights_until_infos = 0
    return done, work, cache, _downloads(hub), hub.requests[("GET", MODEL, "/api/info")]


def test_hub_model_downloads_once_per_node_and_runs(downloaded, tiny_files):
    done, work, _, gets, lookups = downloaded
    _, needed = tiny_files
    rows = read_output(str(work / "out")).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["stages"] == ["text_to_image", "image_to_image"] for r in rows)
    assert lookups == 4  # the driver checked two revisions, each actor looked its own up once
    # Each file the pipeline needs came once; model_index.json also once for each revision that the
    # driver checked (the commit and main).
    assert gets == {**{f: 1 for f in needed}, "model_index.json": 3}
    log = done.stdout + done.stderr
    assert log.count(f"shardgen: downloading {MODEL} at {COMMIT[:12]}: {len(needed)} files") == 1, log[-3000:]


def test_token_is_written_nowhere(downloaded):
    done, work, _, _, _ = downloaded
    haystacks = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode(), **done.logs,
                 **{str(p): p.read_bytes() for p in (work / "out").rglob("*") if p.is_file()}}
    assert str(work / "out" / "_job.json") in haystacks
    assert [where for where, text in haystacks.items() if TOKEN.encode() in text] == []


def test_cached_hub_id_runs_offline(downloaded, hub, tmp_path, monkeypatch):
    """The cache that the job's actors left serves the model offline: the job's steps, run here on
    main as the job resolved it, with HF_HUB_OFFLINE, ask the Hub nothing."""
    _, _, cache, _, _ = downloaded
    for name, value in {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1", "SHARDGEN_CACHE": str(cache)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.requests.clear()
    spec = load_spec_file(_spec(tmp_path, [{"kind": "text_to_image", "model": MODEL}], rows=3))
    assert [r["status"] for r in run_in_process(spec).to_pylist()] == ["ok"] * 3
    assert not hub.requests
