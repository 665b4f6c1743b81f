"""Security rules: manifest URIs stay under allowed prefixes, models load from safetensors with no
custom code, credentials appear nowhere, and ids cannot place files outside the output folder."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import storage
from pipeline.access import OutsideError, check, policy
from pipeline.cli import main
from pipeline.encode import image_name
from pipeline.errors import EXIT_INVALID, EXIT_ROWS_FAILED, SpecError
from pipeline.job import run_job
from pipeline.models.resolve import resolve
from pipeline.spec import FormatSpec, parse_spec
from tests.helpers import prompts_manifest, read_output, small_spec, write_manifest
from tests.s3_fault_proxy import ECHO, FaultProxy
from tests.test_stages import FAST, png

REPO = Path(__file__).resolve().parents[1]


# -- URIs in the manifest ------------------------------------------------------------------------


@pytest.mark.parametrize("uri, resolved", [
    ("s3://bucket/in/a.png", "s3://bucket/in/a.png"),
    ("in/a.png", "s3://bucket/manifests/in/a.png"),  # relative: against the manifest's folder
    ("../in/a.png", "s3://bucket/in/a.png"),  # up, but still in the bucket
    ("S3://bucket/in/./a.png", "s3://bucket/in/a.png"),
    ("s3://shared/public/a.png", "s3://shared/public/a.png"),  # allowed_prefixes
])
def test_allowed_uris_resolve(uri, resolved):
    access = policy("s3://bucket/manifests/m.parquet", False, ["s3://shared/public"])
    assert check(uri, access) == resolved


@pytest.mark.parametrize("uri", [
    "s3://other-bucket/x.png",
    "s3://bucket-evil/x.png",  # a prefix is a whole folder, not the start of a name
    "s3://shared/publicity/x.png",
    "s3://bucket/../other-bucket/x.png",
    "../../other-bucket/x.png",
    "s3://bucket/%2e%2e/other-bucket/x.png",
    "s3://bucket/a%2F..%2F..%2Fother-bucket/x.png",
    "..\\..\\other-bucket\\x.png",
    "http://127.0.0.1:9000/bucket/x.png",
    "gs://bucket/x.png",
    "file:///etc/passwd",
    "/etc/passwd",
    "~/.aws/credentials",
    "simplecache::s3://bucket/x.png",
])
def test_disallowed_uris_are_refused(uri):
    access = policy("s3://bucket/manifests/m.parquet", False, ["s3://shared/public"])
    with pytest.raises(OutsideError, match="outside the allowed prefixes|not allowed"):
        check(uri, access)


def test_local_manifest_reads_its_folder_only(tmp_path):
    folder = tmp_path / "manifests"
    (folder / "in").mkdir(parents=True)
    (folder / "in" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (folder / "in" / "link.png").symlink_to(tmp_path / "secret.png")
    (folder / "in" / "up").symlink_to(tmp_path)
    for manifest, is_folder in ((str(folder / "m.parquet"), False), (str(folder), True)):
        access = policy(manifest, is_folder, [])
        assert check("in/a.png", access) == str(folder / "in" / "a.png")
        assert check(f"file://{folder}/in/../in/a.png", access) == str(folder / "in" / "a.png")
        for uri in ("../secret.png", f"{folder}/../secret.png", "in/link.png", "in/up/secret.png",
                    "%2e%2e/secret.png", f"file://{tmp_path}/secret.png", "s3://bucket/a.png"):
            with pytest.raises(OutsideError, match="outside the allowed prefixes"):
                check(uri, access)


def test_allowed_prefixes_must_be_absolute():
    with pytest.raises(SpecError, match="storage.allowed_prefixes"):
        parse_spec({"manifest": "m.parquet", "output": "out", "storage": {"allowed_prefixes": ["images"]}})


def test_disallowed_uris_are_error_rows(bucket, s3_endpoint, tmp_path, ray_local, capsys):
    """Corpus case "disallowed URIs": every bad form is one error row naming the field; the job
    exits 3 and every other row comes back."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for other in ("other-bucket", "shared"):
        s3.create_bucket(Bucket=other)
    name = bucket.removeprefix("s3://")
    for uri in (f"{bucket}/in/a.png", "s3://other-bucket/x.png", "s3://shared/public/p.png",
                "s3://shared/private/q.png"):
        storage.write_bytes(uri, png(16, 1))
    local = tmp_path / "local.png"
    local.write_bytes(png(16, 2))
    good = {"ok-absolute": f"{bucket}/in/a.png", "ok-relative": "../in/a.png", "ok-shared": "s3://shared/public/p.png"}
    # Every bad URI names an image that exists: what refuses it is the rule, not a missing file.
    bad = {
        "other-bucket": "s3://other-bucket/x.png",
        "http": f"{s3_endpoint}/{name}/in/a.png",
        "file-etc-passwd": "file:///etc/passwd",
        "etc-passwd": "/etc/passwd",
        "local-file": str(local),
        "dotdot-escape": "../../other-bucket/x.png",
        "bucket-dotdot": f"{bucket}/../other-bucket/x.png",
        "encoded-dotdot": f"{bucket}/%2e%2e/other-bucket/x.png",
        "shared-private": "s3://shared/private/q.png",
    }
    rows = [{"id": i, "image": u} for i, u in {**good, **bad}.items()]
    manifest = write_manifest(f"{bucket}/manifests/m.parquet", rows)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "manifest": manifest, "output": f"{bucket}/out", "storage": {"allowed_prefixes": ["s3://shared/public/"]},
        "stages": [{"kind": "super_resolution", **FAST}],
    }))

    assert main(["run", "--spec", str(spec_file)]) == EXIT_ROWS_FAILED

    # The summary counts errors by kind: every refused URI is an `image` error.
    assert f"errors by kind: {{'image': {len(bad)}}}" in capsys.readouterr().out
    out = {r["id"]: r for r in read_output(f"{bucket}/out").to_pylist()}
    assert sorted(out) == sorted(r["id"] for r in rows)
    for row_id in good:
        assert out[row_id]["status"] == "ok", out[row_id]["error"]
    for row_id, uri in bad.items():
        row = out[row_id]
        assert row["status"] == "error" and row["image"] is None
        assert row["error"].startswith(f"image: {uri}"), row["error"]
        assert f"is outside the allowed prefixes ({bucket}/, s3://shared/public/)" in row["error"]


# -- ids -----------------------------------------------------------------------------------------


def _listing(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in (p, *p.parents)}


def test_path_traversal_ids_stay_in_the_output(tmp_path, ray_local):
    """Corpus case "path-traversal ids": nothing lands outside the output folder, every row is ok
    under its original id, and each image's path is one plain file name."""
    ids = ["../../x", "a/b", "/abs", "..\\x", "..", ".hidden", "plain"]
    work = tmp_path / "work"
    output = work / "out"
    manifest = write_manifest(str(work / "m.parquet"), [{"id": i, "prompt": "a red circle"} for i in ids])
    resolve("builtin:tiny-sd")  # built into the session's cache (under the same parent) beforehand
    before = _listing(tmp_path.parent, output), Path("/abs").exists()

    stats = run_job(small_spec(manifest, str(output)))

    assert (stats.ok, stats.error) == (len(ids), 0)
    assert (_listing(tmp_path.parent, output), Path("/abs").exists()) == before
    out = {r["id"]: r for r in read_output(str(output)).to_pylist()}
    assert sorted(out) == sorted(ids)
    names = [out[i]["image"]["path"] for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith(".png")
    assert out["plain"]["image"]["path"] == "plain.png"
    assert {p.name for p in output.iterdir()} == {"data", "_stats.json", "_job.json", "README.md", "_SUCCESS"}


def test_sanitised_names_never_collide():
    fmt = FormatSpec()
    ids = ["a/b", "a_b", "a\\b", "a?b", "a b", "a/b/"]
    assert len({image_name(i, fmt) for i in ids}) == len(ids)


# -- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(environment) -> Path:
    return resolve("builtin:tiny-sd")


def _pickled(tiny_sd: Path, dest: Path) -> Path:
    """tiny-sd with every weight file a pickle: diffusers saves its models so when asked; the
    transformers text encoder (which saves safetensors only) is pickled with torch.save."""
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    DiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True).save_pretrained(dest, safe_serialization=False)
    for weights in dest.rglob("*.safetensors"):
        torch.save(load_file(weights), weights.with_name("pytorch_model.bin"))
        weights.unlink()
    assert not list(dest.rglob("*.safetensors")) and len(list(dest.rglob("*.bin"))) == 3
    return dest


def _run_with_model(tmp_path: Path, model: str, capsys) -> tuple[int, str]:
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(2))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"manifest": manifest, "output": str(tmp_path / "out"),
                                         "stages": [{"kind": "text_to_image", "model": model}]}))
    code = main(["run", "--spec", str(spec_file)])
    assert not (tmp_path / "out").exists()  # refused before anything ran
    return code, capsys.readouterr().err


def test_pickle_only_model_is_refused(tiny_sd, tmp_path, capsys):
    folder = _pickled(tiny_sd, tmp_path / "pickled")
    code, err = _run_with_model(tmp_path, str(folder), capsys)
    assert code == EXIT_INVALID
    assert f"model: {folder} holds weights only as pickles" in err and "unet/diffusion_pytorch_model.bin" in err
    assert "safetensors only" in err


def test_one_pickled_component_is_refused(tiny_sd, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_sd, folder)
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_pretrained(tiny_sd / "unet").save_pretrained(folder / "unet", safe_serialization=False)
    code, err = _run_with_model(tmp_path, str(folder), capsys)
    assert code == EXIT_INVALID and "(unet/diffusion_pytorch_model.bin)" in err


def test_pickle_only_model_on_s3_is_refused_without_download(tiny_sd, bucket, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHARDGEN_CACHE", str(tmp_path / "cache"))
    folder = _pickled(tiny_sd, tmp_path / "pickled")
    for path in folder.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{bucket}/models/pickled/{path.relative_to(folder)}", path.read_bytes())
    code, err = _run_with_model(tmp_path, f"{bucket}/models/pickled", capsys)
    assert code == EXIT_INVALID and "holds weights only as pickles" in err
    assert not (tmp_path / "cache" / "remote").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda index, folder: index.update(unet=["my_unets", "MyUNet"]),
     "model_index.json names unet: my_unets.MyUNet, a class outside diffusers and transformers"),
    (lambda index, folder: index.update(_class_name="MyPipeline"),
     "model_index.json names the pipeline 'MyPipeline', which is not a diffusers pipeline"),
    (lambda index, folder: (index.update(_class_name=["my_pipeline", "MyPipeline"]),
                            (folder / "my_pipeline.py").write_text("raise SystemExit('ran model code')\n")),
     "ships Python code (my_pipeline.py)"),
])
def test_custom_code_is_refused(tiny_sd, tmp_path, capsys, edit, message):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_sd, folder)
    index = json.loads((folder / "model_index.json").read_text())
    edit(index, folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    code, err = _run_with_model(tmp_path, str(folder), capsys)
    assert code == EXIT_INVALID and message in err, err


# -- credentials ---------------------------------------------------------------------------------


def test_spec_never_shows_secrets():
    spec = parse_spec({"manifest": "s3://b/m.parquet", "output": "s3://b/out",
                       "storage": {"key": "PLANTEDKEY123456", "secret": "PLANTEDSECRET123456",
                                   "token": "PLANTEDTOKEN123456"}})
    for text in (repr(spec), str(spec), repr(spec.storage), json.dumps(spec.public_dict()), spec.model_dump_json()):
        assert "PLANTED" not in text


def _files(root: Path):
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            yield p


RUNNER = """
import sys, ray
from pipeline.cli import main
# A Ray of its own (address="local": never one that another `ray start` on this machine left).
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
         object_store_memory=300 * 1024**2, _temp_dir=sys.argv[1])
code = main(["run", "--spec", sys.argv[2]])
ray.shutdown()
sys.exit(code)
"""


def test_planted_secrets_appear_nowhere(bucket, s3_endpoint, tmp_path):
    """Acceptance: a secret planted in the workers' environment and one in the spec's storage
    section (the one the job really uses) appear in no output file, column, log or message. One
    row's image is answered by S3 (the fault proxy) with an error that repeats the request's key
    and token, the one path by which storage could echo credentials into an error row."""
    tag = secrets.token_hex(6)
    planted = {
        "env_key": f"ENVKEYPLANTED{tag}", "env_secret": f"ENVSECRETPLANTED{tag}",
        "env_token": f"ENVTOKENPLANTED{tag}", "spec_key": f"SPECKEYPLANTED{tag}",
        "spec_secret": f"SPECSECRETPLANTED{tag}", "spec_token": f"SPECTOKENPLANTED{tag}",
    }
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="elsewhere")
    storage.write_bytes(f"{bucket}/in/a.png", png(16, 3))
    storage.write_bytes(f"{bucket}/in/echo.png", png(16, 5))
    storage.write_bytes("s3://elsewhere/b.png", png(16, 4))
    rows = [{"id": "ok", "image": f"{bucket}/in/a.png"}, {"id": "missing", "image": f"{bucket}/in/none.png"},
            {"id": "outside", "image": "s3://elsewhere/b.png"}, {"id": "echoed", "image": f"{bucket}/in/echo.png"}]
    manifest = write_manifest(f"{bucket}/m.parquet", rows)
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": planted["env_key"],
           "AWS_SECRET_ACCESS_KEY": planted["env_secret"], "AWS_SESSION_TOKEN": planted["env_token"]}
    # Ray's socket paths must stay short: its temp folder goes under /tmp, not pytest's tmp_path.
    ray_dir = Path(tempfile.mkdtemp(prefix="sg-sec-", dir="/tmp"))
    try:
        with FaultProxy(s3_endpoint, always=ECHO, methods=("GET",), path_contains="/in/echo.png") as proxy:
            spec_file = tmp_path / "spec.yaml"
            spec_file.write_text(yaml.safe_dump({
                "manifest": manifest, "output": str(output),
                "storage": {"endpoint_url": proxy.url, "key": planted["spec_key"], "secret": planted["spec_secret"],
                            "token": planted["spec_token"]},
                "stages": [{"kind": "super_resolution", **FAST}],
            }))
            done = subprocess.run([sys.executable, "-c", RUNNER, str(ray_dir), str(spec_file)], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=540)
        assert done.returncode == EXIT_ROWS_FAILED, done.stderr[-3000:]
        out = {r["id"]: r for r in read_output(str(output)).to_pylist()}
        assert out["ok"]["status"] == "ok"
        assert out["missing"]["error"].startswith("image: no file at")
        assert "outside the allowed prefixes" in out["outside"]["error"]
        # The echoing answer reached the row's error, with the credentials blanked out.
        assert proxy.counts[ECHO] >= 1
        assert out["echoed"]["error"].startswith(f"image: cannot read {bucket}/in/echo.png")
        assert "provided (***) with session token ***" in out["echoed"]["error"], out["echoed"]["error"]

        haystacks = {"stdout": done.stdout, "stderr": done.stderr}
        for path in _files(output):
            haystacks[str(path)] = path.read_bytes().decode("latin-1")
            if path.suffix == ".parquet":
                table = pq.read_table(path)
                haystacks[f"{path} (columns)"] = json.dumps(table.drop_columns(["image"]).to_pylist(), default=str)
                haystacks[f"{path} (metadata)"] = str(table.schema.metadata)
        logs = list(_files(ray_dir))
        assert any("/logs/" in str(p) for p in logs)
        for path in logs:
            haystacks[str(path)] = path.read_bytes().decode("latin-1")
        leaks = [(where, name) for where, text in haystacks.items() for name, value in planted.items() if value in text]
        assert not leaks
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_storage_errors_have_credentials_blanked(monkeypatch):
    spec = parse_spec({"manifest": "m.parquet", "output": "out",
                       "storage": {"key": "SPECKEYPLANTED0001", "secret": "SPECSECRETPLANTED0001"}}).storage
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRETPLANTED0001")
    message = "denied for SPECKEYPLANTED0001/SPECSECRETPLANTED0001 and ENVSECRETPLANTED0001 while testing"
    assert storage.redact(message, spec) == "denied for ***/*** and *** while testing"


def test_stages_never_ask_for_remote_or_custom_code(tiny_sd, monkeypatch):
    """README: shardgen never passes `trust_remote_code` or `custom_pipeline` to from_pretrained;
    the load of every stage goes through DiffusionPipeline.from_pretrained, whose arguments are seen here."""
    from diffusers import DiffusionPipeline

    from pipeline.spec import StageSpec, StorageSpec
    from pipeline.stages import stage_class

    calls = []
    real = DiffusionPipeline.from_pretrained.__func__
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(k) or real(cls, *a, **k)))
    stage_class("text_to_image")(StageSpec(kind="text_to_image", model="builtin:tiny-sd", steps=2), StorageSpec())
    assert len(calls) == 1
    assert not {"trust_remote_code", "custom_pipeline", "custom_revision"} & set(calls[0]), calls[0]
    assert calls[0]["use_safetensors"] is True and calls[0]["local_files_only"] is True
