"""LoRA adapters of a stage: where their weights come from, whether they fit the model (checked on
the driver, from the safetensors headers alone), and how an actor loads and applies them.

Sources follow the model rules: a local file or folder, an s3:// file or folder (copied once per
node into the cache), or a Hub id (its one weight file downloaded once per node, pinned to the
commit its revision names); safetensors only. Unnamed adapters apply to every row and are fused
into the weights once, when the stage has no named ones; named adapters stay separate so that each
group of rows can switch to the set its `lora` column picks.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from pipeline import storage
from pipeline.errors import ModelError
from pipeline.models.cache import cache_root, fill_once
from pipeline.spec import LoraSpec, StageSpec, StorageSpec

SUFFIX = ".safetensors"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The suffixes a LoRA key may end with after diffusers' conversion, and which of the pair it is:
# "down" maps the layer's input (rank x in), "up" its output (out x rank).
PAIR_SUFFIXES = {".lora_A.weight": "down", ".lora.down.weight": "down",
                 ".lora_B.weight": "up", ".lora.up.weight": "up"}
# A picked row's `lora` value joins its adapters' names with this (an empty string: none).
JOIN = ","


def adapter_names(stage: StageSpec) -> list[str]:
    """Each adapter's name inside the pipeline: its own, or a position-based one when unnamed."""
    return [lora.name or f"lora{k}" for k, lora in enumerate(stage.loras)]


def selectable(stage: StageSpec) -> list[str]:
    return [lora.name for lora in stage.loras if lora.name]


def _pick(where: str, names: list[str], weight_name: str | None) -> str:
    """The weight file of a folder or repo that holds ``names``."""
    if weight_name is not None:
        if not weight_name.endswith(SUFFIX):
            raise ModelError(f"loras: weight_name {weight_name!r} of {where} is not a {SUFFIX} file "
                             "(shardgen loads safetensors only)")
        if weight_name not in names:
            raise ModelError(f"loras: {where} has no file {weight_name!r}")
        return weight_name
    weights = [n for n in names if n.endswith(SUFFIX)]
    if len(weights) == 1:
        return weights[0]
    if not weights:
        pickled = [n for n in names if n.endswith(PICKLES)]
        why = f"only pickled weights {pickled}, which shardgen does not load" if pickled else "no weights"
        raise ModelError(f"loras: {where} has {why}; a LoRA is a {SUFFIX} file")
    raise ModelError(f"loras: {where} holds several {SUFFIX} files {sorted(weights)}; name one with weight_name")


def _cached(key: str, fill) -> Path:
    """The one file that ``fill(folder)`` puts in a cache folder, filled once per node."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = fill_once(cache_root() / "lora" / digest, fill)
    return next(p for p in folder.iterdir() if p.name.endswith(SUFFIX))


def _from_hub(lora: LoraSpec) -> tuple[Path, str]:
    from pipeline.models import hub

    api = hub._api()
    try:
        info = api.model_info(lora.source, revision=lora.revision, files_metadata=False)
    except Exception as err:  # noqa: BLE001 - hub._refusal sorts the Hub's errors into exit codes
        raise hub._refusal(lora.source, lora.revision, err) from None
    name = _pick(lora.source, [s.rfilename for s in info.siblings or []], lora.weight_name)

    def fill(tmp: Path) -> None:
        from huggingface_hub import hf_hub_download

        tmp.mkdir(parents=True)
        got = hf_hub_download(lora.source, name, revision=info.sha, endpoint=hub._endpoint(), token=hub._token(),
                              cache_dir=tmp / ".hub")
        shutil.copyfile(got, tmp / Path(name).name)
        shutil.rmtree(tmp / ".hub")

    return _cached(f"hub|{lora.source}|{info.sha}|{name}", fill), info.sha


def fetch(lora: LoraSpec, storage_spec: StorageSpec | None) -> tuple[Path, str | None]:
    """The adapter's weight file on this node and, for a Hub id, the commit it was taken from."""
    from pipeline.models import hub

    source = lora.source
    if hub.is_hub_id(source):
        return _from_hub(lora)
    if lora.revision:
        raise ModelError(f"loras: revision is for a hub id (org/name), not {source}")
    if storage.is_remote(source):
        if source.endswith(SUFFIX):
            folder, name = source.rsplit("/", 1)
        else:
            folder, name = source, _pick(source, storage.list_files(source, storage_spec), lora.weight_name)
        uri = storage.join(folder, name)

        def fill(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            try:
                (tmp / Path(name).name).write_bytes(storage.read_bytes(uri, storage_spec))
            except FileNotFoundError:
                raise ModelError(f"loras: no file at {uri}") from None

        return _cached(f"remote|{uri}", fill), None
    local = Path(source).expanduser()
    if local.is_file():
        _pick(source, [local.name], lora.weight_name or local.name)
        return local, None
    if local.is_dir():
        return local / _pick(source, [p.name for p in local.iterdir() if p.is_file()], lora.weight_name), None
    raise ModelError(f"loras: no file or folder at {source}")


def _state_dict(pipeline_class: str, file: Path) -> dict:
    """The adapter's tensors as diffusers loads them (Kohya and other layouts converted)."""
    import diffusers

    loaded = getattr(diffusers, pipeline_class).lora_state_dict(str(file))
    return loaded[0] if isinstance(loaded, tuple) else loaded


def _component_shapes(folder: Path, component: str) -> dict[str, tuple[int, ...]]:
    """Every weight's shape in a component folder, read from the safetensors headers only."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted((folder / component).glob(f"*{SUFFIX}")):
        with safe_open(str(file), "pt") as f:
            shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return shapes


def misfits(state: dict, folder: Path) -> list[str]:
    """The adapter's layers that the model at ``folder`` lacks or has in another shape."""
    shapes: dict[str, dict] = {}
    problems = []
    for key, tensor in state.items():
        suffix = next((s for s in PAIR_SUFFIXES if key.endswith(s)), None)
        if suffix is None or "." not in key:
            continue
        component, layer = key[:-len(suffix)].split(".", 1)
        if component not in shapes:
            shapes[component] = _component_shapes(folder, component)
        base = shapes[component].get(f"{layer}.weight")
        got = tuple(tensor.shape)
        if base is None:
            problems.append(f"{component}.{layer} (no such layer)")
        elif (PAIR_SUFFIXES[suffix] == "down" and got[1] != base[1]) or (
                PAIR_SUFFIXES[suffix] == "up" and got[0] != base[0]):
            problems.append(f"{component}.{layer} (weight {list(base)}, adapter {list(got)})")
    return sorted(set(problems))


def check(stage: StageSpec, pipeline_class: str, folder: Path | None, storage_spec: StorageSpec | None) -> None:
    """Refuse (exit 2) an adapter that cannot be fetched or, when the model is a folder on this
    machine, one whose layers do not fit it; a remote model's fit is checked as an actor loads it."""
    for k, lora in enumerate(stage.loras):
        file, _ = fetch(lora, storage_spec)
        state = _state_dict(pipeline_class, file)
        if not any(key.endswith(tuple(PAIR_SUFFIXES)) for key in state):
            raise ModelError(f"loras.{k}: {lora.source} holds no LoRA layers diffusers can load")
        if folder is not None:
            bad = misfits(state, folder)
            if bad:
                shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                raise ModelError(f"loras.{k}: {lora.source} does not fit the model {stage.model}: {shown}")


class Adapters:
    """A stage's adapters in a loaded pipeline: fused at load when none is named, else switched
    per group of rows to the set the rows picked."""

    def __init__(self, pipe, stage: StageSpec, storage_spec: StorageSpec | None):
        self.pipe = pipe
        self.stage = stage
        self.names = adapter_names(stage)
        self.revisions = []
        for lora, name in zip(stage.loras, self.names):
            file, commit = fetch(lora, storage_spec)
            self.revisions.append(commit)
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        self.fused = bool(stage.loras) and not selectable(stage)
        self.active: tuple[str, ...] | None = None
        if self.fused:
            # One fixed set: merged into the weights, the denoiser runs at the base model's speed.
            pipe.set_adapters(self.names, [lora.scale for lora in stage.loras])
            pipe.fuse_lora(adapter_names=self.names)
            pipe.unload_lora_weights()

    def use(self, picked: str | None) -> None:
        """Apply the unnamed adapters and the named ones in ``picked`` (a row's `lora` value)."""
        if self.fused or not self.stage.loras:
            return
        chosen = set(picked.split(JOIN)) if picked else set()
        active = tuple(n for lora, n in zip(self.stage.loras, self.names) if not lora.name or lora.name in chosen)
        if active == self.active:
            return
        if active:
            self.pipe.enable_lora()
            self.pipe.set_adapters(list(active), [lora.scale for lora, n in zip(self.stage.loras, self.names)
                                                  if n in active])
        else:
            self.pipe.disable_lora()
        self.active = active

    def record(self, picked: str | None) -> list[dict]:
        """What the row's stage_params say of its adapters: each applied one's source, name,
        revision and scale."""
        chosen = set(picked.split(JOIN)) if picked else set()
        return [{"source": lora.source, "name": name, "weight_name": lora.weight_name,
                 "revision": commit or lora.revision, "scale": lora.scale}
                for lora, name, commit in zip(self.stage.loras, self.names, self.revisions)
                if not lora.name or lora.name in chosen]


def row_choice(value: str | None, stage: StageSpec, given: bool) -> str:
    """A row's `lora` value as the named adapters it picks (comma-joined, "" for none); without the
    column every named adapter applies. An unknown name raises InputError naming the column."""
    from pipeline.images import InputError

    named = selectable(stage)
    if not given:
        return JOIN.join(named)
    picked = [] if value is None else [n.strip() for n in value.split(JOIN) if n.strip()]
    unknown = [n for n in picked if n not in named]
    if unknown:
        raise InputError(f"lora: {unknown} are not named adapters of the stage (its names: {named})")
    return JOIN.join(sorted(set(picked)))
