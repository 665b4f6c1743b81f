"""Models named by a Hugging Face Hub id (``org/name``), with an optional ``revision`` (a branch, a
tag or a commit hash, which pins it) and ``variant`` (e.g. fp16).

Only the files a diffusers pipeline loads are downloaded: model_index.json and, in the folders of
the components it names, json configs, tokenizer files and safetensors weights (of the variant when
one is asked); never pickles, custom code or the single-file checkpoints many repositories keep at
their root. A model is downloaded once per node into the model cache, at
``$SHARDGEN_CACHE/hub/ORG--NAME/COMMIT[.VARIANT]`` (one actor downloads, the others wait for it), with
its variant files renamed to the plain names so that stages load it as any local folder. A branch
or tag is looked up on each load (one small request); a cached commit needs no network at all.

The token comes from HF_TOKEN (or a stored ``hf auth login``); it never appears in a message.
HF_ENDPOINT and HF_HUB_OFFLINE are read at call time: offline, only what the cache holds runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from pipeline.errors import ModelError, ShardgenError
from pipeline.models.cache import COMPLETE_MARKER, cache_root, fill_once
from pipeline.models.checks import check_model

COMMIT = re.compile(r"[0-9a-f]{40}")
# Tokenizer files besides json: BPE merges and WordPiece vocabularies, SentencePiece models (protobuf).
NEEDED_SUFFIXES = (".json", ".txt", ".model")
# A weight file ``STEM[.VARIANT][-0000K-of-0000N].safetensors``, and its shard index
# ``STEM.safetensors.index[.VARIANT].json`` (the names diffusers and transformers save).
WEIGHTS = re.compile(r"(?P<stem>[^.]+)(?:\.(?P<variant>[^.-]+))?(?P<shard>-\d{5}-of-\d{5})?\.safetensors")
INDEX = re.compile(r"(?P<stem>[^.]+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json")


def is_hub_id(source: str) -> bool:
    """Whether ``source`` is written as a hub id ``org/name`` (a local folder of that name wins)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.count("/") != 1 or source.startswith((".", "~")) or Path(source).expanduser().exists():
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _redact(text: str) -> str:
    token = _token()
    return text.replace(token, "***") if token else text


def _named(repo: str, revision: str | None) -> str:
    return f"{repo} (revision {revision})" if revision else repo


def _refusal(repo: str, revision: str | None, err: Exception) -> ShardgenError:
    """The error to show for a failed Hub request: exit 2 for what the user must fix (a typo, a
    missing token, a gated model), exit 1 for a Hub that cannot be reached."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(err, "response", None), "status_code", None)
    token_note = "HF_TOKEN is set" if _token() else "HF_TOKEN is not set"
    if isinstance(err, GatedRepoError):
        return ModelError(f"model: {repo} is gated on the Hugging Face Hub and this token has no access to it "
                          f"({token_note}): accept the model's conditions on its page, then set HF_TOKEN to a "
                          "token of that account")
    if isinstance(err, RepositoryNotFoundError):
        return ModelError(f"model: {repo} is neither a local folder nor a model on the Hugging Face Hub at "
                          f"{_endpoint() or 'huggingface.co'} (a private model needs a token with access; "
                          f"{token_note})")
    if isinstance(err, RevisionNotFoundError):
        return ModelError(f"revision: {revision!r} is not a branch, tag or commit of {repo}")
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        return ModelError(f"model: the Hugging Face Hub refused access to {_named(repo, revision)} (HTTP {status}; "
                          f"{token_note})")
    return ShardgenError(_redact(f"model: cannot reach the Hugging Face Hub for {_named(repo, revision)}: "
                                 f"{type(err).__name__}: {err}"))


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), token=_token())


def _pipeline_folders(model_index: dict | None) -> set[str]:
    """The component folders that model_index.json names (those that a pipeline loads)."""
    return {name for name, value in (model_index or {}).items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None}


def pipeline_files(files: list[str], model_index: dict | None) -> list[str]:
    """The files a pipeline is made of, whatever their kind: the root's and its components'. Checked
    as a folder is (checks.check_model: no pickle-only weights, no Python code)."""
    folders = _pipeline_folders(model_index)
    return [f for f in files if "/" not in f or f.split("/", 1)[0] in folders]


def _variant_of(name: str) -> tuple[bool, str | None]:
    """Whether ``name`` is a safetensors weight file or index, and its variant."""
    base = name.rsplit("/", 1)[-1]
    match = WEIGHTS.fullmatch(base) or INDEX.fullmatch(base)
    return match is not None, match["variant"] if match else None


def select(files: list[str], model_index: dict | None, variant: str | None) -> list[str]:
    """The files to download: model_index.json, and in each component folder its json configs and
    tokenizer files and its safetensors weights of ``variant`` (the plain ones where a component has
    none of that variant, as diffusers does)."""
    chosen = ["model_index.json"] if "model_index.json" in files else []
    for folder in sorted(_pipeline_folders(model_index)):
        names = [f for f in files if f.startswith(folder + "/") and f.endswith((*NEEDED_SUFFIXES, ".safetensors"))]
        names = [f for f in names if ".bin.index" not in f]  # the shard index of pickled weights
        weights = {f: _variant_of(f)[1] for f in names if _variant_of(f)[0]}
        wanted = variant if variant in weights.values() else None
        chosen += [f for f in names if f not in weights or weights[f] == wanted]
    return chosen


def _unvariant(folder: Path, variant: str) -> None:
    """Give a variant's weight file and shard index the plain names that from_pretrained looks for
    without ``variant=`` (shards keep theirs: the index names them)."""
    for pattern in (f"*.{variant}.safetensors", f"*.safetensors.index.{variant}.json"):
        for path in list(folder.rglob(pattern)):
            path.rename(path.with_name(path.name.replace(f".{variant}.", ".")))


def _info(repo: str, revision: str | None):
    try:
        return _api().model_info(repo, revision=revision, files_metadata=True)
    except Exception as err:  # the library's HTTP and connection errors, turned into ours
        raise _refusal(repo, revision, err) from None


def _read_index(repo: str, commit: str, folder: Path) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo, "model_index.json", revision=commit, local_dir=folder, endpoint=_endpoint(),
                               token=_token())
    except Exception as err:
        raise _refusal(repo, commit, err) from None
    return json.loads(Path(path).read_text())


def _model_dir(repo: str) -> Path:
    return cache_root() / "hub" / repo.replace("/", "--")


def _ref_file(repo: str, revision: str | None) -> Path:
    return _model_dir(repo) / "refs" / quote(revision or "main", safe="")


def _snapshot_dir(repo: str, commit: str, variant: str | None) -> Path:
    return _model_dir(repo) / (f"{commit}.{variant}" if variant else commit)


def _cached_commit(repo: str, revision: str | None) -> str | None:
    if revision and COMMIT.fullmatch(revision):
        return revision
    ref = _ref_file(repo, revision)
    return ref.read_text().strip() if ref.is_file() else None


def _remember(repo: str, revision: str | None, commit: str) -> None:
    ref = _ref_file(repo, revision)
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def _cached(repo: str, revision: str | None, variant: str | None) -> Path | None:
    """The complete folder of ``repo`` at ``revision`` in this node's cache (a branch or tag as it
    was last resolved here), or None."""
    commit = _cached_commit(repo, revision)
    folder = _snapshot_dir(repo, commit, variant) if commit else None
    return folder if folder is not None and (folder / COMPLETE_MARKER).exists() else None


def _offline_snapshot(repo: str, revision: str | None, variant: str | None) -> Path:
    folder = _cached(repo, revision, variant)
    if folder is None:
        raise ModelError(f"model: {_named(repo, revision)}{f' variant {variant}' if variant else ''} is not in the "
                         f"model cache on {socket.gethostname()} and HF_HUB_OFFLINE is set, so nothing is downloaded")
    return folder


def contents(repo: str, revision: str | None, variant: str | None) -> tuple[list[str], dict | None]:
    """The pipeline's file names and its model_index.json, from the Hub's listing and that one small
    file (no weights are downloaded); offline, from the model cache."""
    if offline():
        folder = _offline_snapshot(repo, revision, variant)
        return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()], \
            json.loads((folder / "model_index.json").read_text())
    info = _info(repo, revision)
    files = [s.rfilename for s in info.siblings or []]
    with tempfile.TemporaryDirectory() as tmp:
        index = _read_index(repo, info.sha, Path(tmp)) if "model_index.json" in files else None
    if variant and not any(_variant_of(f) == (True, variant) for f in pipeline_files(files, index)):
        raise ModelError(f"variant: {repo} has no safetensors weights of the variant {variant!r}")
    return pipeline_files(files, index), index


def snapshot(repo: str, revision: str | None, variant: str | None) -> Path:
    """The local folder of ``repo`` at ``revision``, downloaded into the model cache once per node."""
    if offline():
        return _offline_snapshot(repo, revision, variant)
    if revision and COMMIT.fullmatch(revision) and (folder := _cached(repo, revision, variant)):
        return folder  # a commit never changes: no request
    info = _info(repo, revision)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}

    def download(tmp: Path) -> None:
        from huggingface_hub import snapshot_download

        index = _read_index(repo, info.sha, tmp)
        check_model(repo, pipeline_files(list(sizes), index), index)
        files = select(list(sizes), index, variant)
        start = time.perf_counter()
        # Once per node: only the actor that fills the cache gets here, the others wait on its lock.
        print(f"shardgen: downloading {repo} at {info.sha[:12]}{f' ({variant})' if variant else ''}: "
              f"{len(files)} files, {sum(sizes[f] for f in files) / 1e6:.1f} MB, into the model cache on "
              f"{socket.gethostname()}", file=sys.stderr, flush=True)
        try:
            snapshot_download(repo, revision=info.sha, local_dir=tmp, allow_patterns=files, endpoint=_endpoint(),
                              token=_token())
        except Exception as err:
            raise _refusal(repo, revision, err) from None
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        if variant:
            _unvariant(tmp, variant)
        print(f"shardgen: downloaded {repo} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    folder = fill_once(_snapshot_dir(repo, info.sha, variant), download)
    _remember(repo, revision, info.sha)
    return folder
