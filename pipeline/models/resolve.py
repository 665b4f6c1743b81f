"""Turn a model source into a local folder that ``from_pretrained`` loads.

Sources: ``builtin:NAME`` (a trained model shipped in pipeline/models/trained/, or a tiny
random-weight model built once into the cache), a local folder, a remote folder such as
``s3://bucket/models/sd`` (copied once per node into the cache), or a Hugging Face Hub id
``org/name`` (its pipeline files downloaded once per node into the cache, see hub.py). Every folder
passes the checks of pipeline/models/checks.py (safetensors only, no custom code) before it is
handed out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline import storage
from pipeline.errors import ModelError
from pipeline.families import check_family, size_problem, size_warning
from pipeline.kinds import KINDS
from pipeline.models import hub
from pipeline.models.cache import COMPLETE_MARKER, cache_root, fill_once
from pipeline.models.checks import check_model
from pipeline.spec import JobSpec, StorageSpec

BUILTIN_PREFIX = "builtin:"
TRAINED_DIR = Path(__file__).parent / "trained"


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
    return fill_once(cache_root() / "builtin" / name, lambda tmp: builtin.build(name, tmp))


def _model_index(text: bytes | str | None) -> dict | None:
    return None if text is None else json.loads(text)


def folder_contents(folder: Path) -> tuple[list[str], dict | None]:
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    index = folder / "model_index.json"
    return files, _model_index(index.read_text() if index.is_file() else None)


def check_folder(source: str, folder: Path) -> None:
    check_model(source, *folder_contents(folder))


def _unbuilt_contents(name: str) -> tuple[list[str], dict]:
    """A random-weight built-in that is not in the cache yet, built in memory and never saved:
    the model_index.json its folder would have, and no files (it holds no pickles and no code)."""
    from pipeline.models import builtin

    pipe = builtin.BUILDERS[name]()
    index = {key: list(value) if isinstance(value, tuple) else value for key, value in pipe.config.items()}
    return [], {"_class_name": type(pipe).__name__, **index}


def contents(source: str, storage_spec: StorageSpec | None = None, revision: str | None = None,
             variant: str | None = None, build: bool = True) -> tuple[list[str], dict | None]:
    """The file names and model_index.json of a model source. A remote folder is listed and a hub id
    looked up, without downloading their weights; with ``build`` False, a random-weight built-in
    that is not in the cache is not written there either."""
    if hub.is_hub_id(source):
        return hub.contents(source, revision, variant)
    _refuse_hub_options(source, revision, variant)
    name = source.removeprefix(BUILTIN_PREFIX)
    if not build and source.startswith(BUILTIN_PREFIX) and name not in shipped_names() and \
            not (cache_root() / "builtin" / name / COMPLETE_MARKER).exists():
        if name not in builtin_names():
            raise ModelError(f"model: unknown built-in {source}; built-in models: {builtin_names()}")
        return _unbuilt_contents(name)
    if storage.is_remote(source):
        files = storage.list_files(source, storage_spec)
        if not files:
            raise ModelError(f"model: no files under {source}")
        index = storage.read_bytes(storage.join(source, "model_index.json"), storage_spec) \
            if "model_index.json" in files else None
        return files, _model_index(index)
    return folder_contents(locate(source, storage_spec, revision, variant))


def check_sources(spec: JobSpec, build: bool = True) -> list[str]:
    """Refuse, on the driver before any actor starts, a model that cannot be loaded, that no stage
    of its kind can run, or asked a size its family cannot make (exit 2), instead of a job of failed
    rows; return one warning per stage asked a size far from its family's native one. Remote
    folders and hub ids are listed, not downloaded; ``build`` False (validate) writes no built-in
    into the cache."""
    indexes: dict[tuple, dict | None] = {}
    for key in dict.fromkeys((s.model, s.revision, s.variant) for s in spec.all_stages()):
        files, indexes[key] = contents(key[0], spec.storage, key[1], key[2], build)
        check_model(key[0], files, indexes[key])
    warnings = []
    for name, flow in spec.flow_map().items():
        prefix = "stages" if spec.flows is None else f"flows.{name}"
        for i, stage in enumerate(flow):
            family = check_family(stage.model, indexes[(stage.model, stage.revision, stage.variant)], stage)
            if stage.conditioned:
                from pipeline.conditioning import checks

                # A hub or remote model's weights are not on the driver: its adapters' fit is checked as it loads.
                here = not (hub.is_hub_id(stage.model) or storage.is_remote(stage.model))
                folder = locate(stage.model, spec.storage, None, None) if here else None
                checks.check_stage(stage, family, indexes[(stage.model, stage.revision, stage.variant)],
                                   spec.storage, folder)
            if KINDS[stage.kind].size_from != "spec":
                continue
            problem = size_problem(family, stage.width, stage.height)
            if problem:
                raise ModelError(f"{prefix}.{i}.{problem} (model {stage.model})")
            # The built-ins are trained at their own small size, which their recommended settings give.
            warning = None if stage.model.startswith(BUILTIN_PREFIX) else size_warning(family, stage.width,
                                                                                      stage.height)
            if warning:
                warnings.append(f"shardgen: warning: {prefix}.{i}: {warning} (model {stage.model})")
    return warnings


def resolve(source: str, storage_spec: StorageSpec | None = None, revision: str | None = None,
            variant: str | None = None) -> Path:
    folder = locate(source, storage_spec, revision, variant)
    check_folder(source, folder)
    return folder


def _refuse_hub_options(source: str, revision: str | None, variant: str | None) -> None:
    if revision or variant:
        field = "revision" if revision else "variant"
        raise ModelError(f"{field}: only a hub id (org/name) has revisions and variants, not the model {source}")


def locate(source: str, storage_spec: StorageSpec | None, revision: str | None, variant: str | None) -> Path:
    """The local folder of ``source`` (a hub id, a built-in, a remote URI or a local folder), fetched
    into the model cache when it is not local; what the folder holds is not checked here."""
    if hub.is_hub_id(source):
        return hub.snapshot(source, revision, variant)
    _refuse_hub_options(source, revision, variant)
    if source.startswith(BUILTIN_PREFIX):
        return build_builtin(source[len(BUILTIN_PREFIX):])
    if storage.is_remote(source):
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        try:
            return fill_once(
                cache_root() / "remote" / digest,
                lambda tmp: storage.download_folder(source, tmp, storage_spec),
            )
        except FileNotFoundError as err:
            raise ModelError(f"model: {err}") from None
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    raise ModelError(f"model: no folder at {source}")
