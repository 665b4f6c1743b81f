"""Turn a model source into a local folder that ``from_pretrained`` loads.

Sources: ``builtin:NAME`` (a trained model shipped in pipeline/models/trained/, or a tiny
random-weight model built once into the cache), a local folder, a remote folder such as
``s3://bucket/models/sd`` (copied once per node into the cache), or a hub id already in the local
Hugging Face cache (nothing is downloaded at run time). Every folder passes the checks of
pipeline/models/checks.py (safetensors only, no custom code) before it is handed out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

from pipeline import storage
from pipeline.errors import ModelError
from pipeline.families import check_family
from pipeline.models.checks import check_model
from pipeline.spec import JobSpec, StorageSpec

BUILTIN_PREFIX = "builtin:"
TRAINED_DIR = Path(__file__).parent / "trained"
COMPLETE_MARKER = ".shardgen-complete"


def cache_root() -> Path:
    return Path(os.environ.get("SHARDGEN_CACHE", Path.home() / ".cache" / "shardgen"))


def _fill_once(dest: Path, fill) -> Path:
    """Run ``fill(tmp)`` once per machine, even with many actors racing, and publish it at ``dest``."""
    if (dest / COMPLETE_MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / COMPLETE_MARKER).exists():
            tmp = dest.with_name(dest.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            fill(tmp)
            (tmp / COMPLETE_MARKER).touch()
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
    return dest


def shipped_names() -> list[str]:
    """Trained pipelines that ship with the package (folders holding a model_index.json)."""
    return sorted(p.parent.name for p in TRAINED_DIR.glob("*/model_index.json"))


def builtin_names() -> list[str]:
    from pipeline.models.builtin import BUILDERS

    return sorted([*BUILDERS, *shipped_names()])


def build_builtin(name: str) -> Path:
    from pipeline.models import builtin

    if name in shipped_names():
        return TRAINED_DIR / name
    if name not in builtin.BUILDERS:
        raise ModelError(f"model: unknown built-in {BUILTIN_PREFIX}{name}; built-in models: {builtin_names()}")
    return _fill_once(cache_root() / "builtin" / name, lambda tmp: builtin.build(name, tmp))


def _model_index(text: bytes | str | None) -> dict | None:
    return None if text is None else json.loads(text)


def check_folder(source: str, folder: Path) -> None:
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    index = folder / "model_index.json"
    check_model(source, files, _model_index(index.read_text() if index.is_file() else None))


def check_sources(spec: JobSpec) -> None:
    """Refuse, on the driver before any actor starts, a model that cannot be loaded (exit 2). A
    remote folder is checked by listing it, without copying it here."""
    indexes: dict[str, dict] = {}
    for source in dict.fromkeys(stage.model for stage in spec.all_stages()):
        if storage.is_remote(source):
            files = storage.list_files(source, spec.storage)
            if not files:
                raise ModelError(f"model: no files under {source}")
            index = storage.read_bytes(storage.join(source, "model_index.json"), spec.storage) \
                if "model_index.json" in files else None
            check_model(source, files, _model_index(index))
            indexes[source] = _model_index(index)
        else:
            indexes[source] = json.loads((resolve(source) / "model_index.json").read_text())
    # A model that no stage of its kind can run is refused here, not as a job of failed rows.
    for stage in spec.all_stages():
        check_family(stage.model, indexes[stage.model], stage)


def resolve(source: str, storage_spec: StorageSpec | None = None) -> Path:
    folder = _locate(source, storage_spec)
    check_folder(source, folder)
    return folder


def _locate(source: str, storage_spec: StorageSpec | None) -> Path:
    if source.startswith(BUILTIN_PREFIX):
        return build_builtin(source[len(BUILTIN_PREFIX):])
    if storage.is_remote(source):
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        try:
            return _fill_once(
                cache_root() / "remote" / digest,
                lambda tmp: storage.download_folder(source, tmp, storage_spec),
            )
        except FileNotFoundError as err:
            raise ModelError(f"model: {err}") from None
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or source.startswith("."):
        raise ModelError(f"model: no folder at {source}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as err:
        raise ModelError(
            f"model: {source!r} is not a built-in, a folder or a hub id in the local cache "
            f"(nothing is downloaded at run time): {err}"
        ) from None
