"""The plan builder: the only module that knows Ray Data.

read manifest -> prepare (CPU) -> one actor pool per diffusion stage -> encode (CPU) -> write.
Stages chain in one streaming job; images pass between them in memory.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.data._internal.logical.interfaces import LogicalPlan
from ray.data._internal.logical.operators.map_operator import StreamingRepartition
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data.exceptions import ExecutionTimeoutError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import access, manifest, progress, route, storage
from pipeline.cluster import check_address, connect, ensure_ray
from pipeline.done_ids import DoneIds
from pipeline.encode import encode_batch, seconds_per_image
from pipeline.errors import NoProgressError, ShardgenError, SpecError
from pipeline.kinds import KINDS
from pipeline.output_schema import FILTERED, status_counts
from pipeline.prepare import prepare_batch
from pipeline.shard_publisher import ShardPublisher
from pipeline.spec import AUTO_MAX_BATCH, AUTO_START_BATCH, JobSpec, StageSpec
from pipeline.stages import stage_class
from pipeline.stats import ActorMetrics
from pipeline.synth.filters import score_batch
from pipeline.tracker import JobTracker
from pipeline.writers.shards import ShardReport, ShardWriter, output_rows

# Reading, prepare, encode and writing are light next to diffusion: a quarter CPU each lets them
# run beside actor pools that reserve most CPUs of a node (a task that asked for a whole CPU
# could wait forever behind actors that wait for its rows).
CPU_STEP_CPUS = 0.25
MAX_READ_BLOCKS = 4096
# The most rows a block ahead of a flow's stages holds to be a multiple of all their batch sizes.
MAX_BLOCK_ROWS = 4096
# Seconds of encoding per write task: short enough that the last rows are encoded in parallel
# within seconds of their stage, long enough that a task's overhead is small beside its work.
ENCODE_BUNDLE_S = 2.0
# The progress line skips an update rather than wait longer than this for the counts.
READ_COUNTS_S = 5
# How long an interrupted run waits for the rows it holds to be published.
PUBLISH_ON_INTERRUPT_S = 60
def _node_cpus() -> float:
    """The CPUs of the largest live node: no actor can reserve more."""
    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)


def fit_resources(spec: JobSpec, have_cpu: float, have_gpu: float, node_cpu: float) -> JobSpec:
    """``spec`` with every stage's CPUs and GPUs per actor decided. Fields the spec sets are kept
    as written. Unset ones: a GPU when the cluster has GPUs (with 1 CPU); on a cluster without
    GPUs, no GPU and the CPUs left beside the explicit stages and the light CPU steps, shared
    among the unset stages' minimum actors (whole CPUs when there is at least one each). With
    GPUs, unset pools are fixed, over an even share of the GPUs."""
    stages = spec.all_stages()
    unset = [s for s in stages if s.fits_cpus]
    if have_gpu >= 1:
        share = 1.0
    else:
        left = have_cpu - CPU_STEP_CPUS - sum(s.actors[0] * s.cpus_per_actor for s in stages if s not in unset)
        share = left / max(1, sum(s.actors[0] for s in unset))
        share = min(float(math.floor(share)) if share >= 1 else math.floor(share * 100) / 100, node_cpu or share)
        share = max(share, 0.01)  # a cluster too small for any share is refused by check_fits

    def gpus(stage: StageSpec) -> float:
        return stage.gpus_per_actor if stage.gpus_per_actor is not None else (1.0 if have_gpu >= 1 else 0.0)

    def pooled(stage: StageSpec) -> bool:
        return "actors" in stage.model_fields_set

    # With GPUs, a GPU stage whose `actors` is unset gets a fixed pool over an even share of the
    # GPUs left beside the stages that set theirs (at their largest): Ray Data's GPU actor pools do
    # not grow as they should (Ray issue 59144), and a fixed pool loads every model at once, before
    # the rows come.
    gpu_pools = [s for s in stages if gpus(s) > 0 and not pooled(s)]
    gpu_share = (have_gpu - sum(s.actors[1] * gpus(s) for s in stages if pooled(s))) / max(1, len(gpu_pools))

    def fitted(stage: StageSpec) -> StageSpec:
        update = {"gpus_per_actor": gpus(stage), "cpus_per_actor": share if stage.fits_cpus else stage.cpus_per_actor}
        if have_gpu >= 1 and gpus(stage) > 0 and not pooled(stage):
            size = max(1, math.floor(gpu_share / gpus(stage) + 1e-9))
            update["actors"] = (size, size)
        return stage.model_copy(update=update)

    if spec.flows is None:
        return spec.model_copy(update={"stages": [fitted(s) for s in spec.stages]})
    return spec.model_copy(update={"flows": {name: [fitted(s) for s in flow] for name, flow in spec.flows.items()}})


def cluster_resources() -> tuple[float, float, float]:
    """CPUs and GPUs of the cluster, and the CPUs of its largest node."""
    have = ray.cluster_resources()
    return have.get("CPU", 0), have.get("GPU", 0), _node_cpus()


def resources_for_run() -> tuple[float, float, float, str]:
    """What a run would have: CPUs, GPUs, the largest node's CPUs, and which Ray that is. A local
    Ray is not started for this: it would get this machine's CPUs and GPUs."""
    if ray.is_initialized():
        return (*cluster_resources(), "the Ray this process joined")
    address = check_address()
    if address is None:
        import torch
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
        return cpus, float(torch.cuda.device_count()), cpus, "a local Ray on this machine"
    connect(address)
    return (*cluster_resources(), f"the Ray cluster at {address}")


def check_fits(spec: JobSpec, have_cpu: float, have_gpu: float, log=print) -> None:
    """Every pool starts its minimum actors at once; if they cannot all fit beside the light CPU
    steps, the job would wait forever. Refuse such a job on a fixed cluster; on one that may
    grow (an autoscaler), say so and go on. ``spec`` has its resources fitted (fit_resources)."""
    stages = spec.all_stages()
    need_cpu = sum(s.actors[0] * s.cpus_per_actor for s in stages) + CPU_STEP_CPUS
    need_gpu = sum(s.actors[0] * s.gpus_per_actor for s in stages)
    if need_cpu <= have_cpu and need_gpu <= have_gpu:
        return
    message = (f"the stages' minimum actors need {need_cpu:g} CPUs and {need_gpu:g} GPUs (with "
               f"{CPU_STEP_CPUS} CPU for reading and encoding), the cluster has {have_cpu:g} CPUs and "
               f"{have_gpu:g} GPUs: lower actors, cpus_per_actor or gpus_per_actor")
    if os.environ.get("SHARDGEN_AUTOSCALING"):
        log(f"shardgen: warning: {message}; waiting for the autoscaler")
    else:
        raise SpecError(f"{message} (set SHARDGEN_AUTOSCALING=1 where the cluster grows on demand)")


def _count(counter, table: pa.Table, kind: str, last: bool) -> None:
    counter.add.remote(kind, table.num_rows)
    if last:  # the rows are done: they only wait for their shard now
        counter.add.remote(progress.DONE, table.num_rows)
        counts = status_counts(table)
        counter.add.remote(progress.OK, counts.get("ok", 0))
        counter.add.remote(progress.FILTERED, counts.get(FILTERED, 0))


def _counted(cls: type, counter, kind: str, last: bool) -> type:
    """``cls`` that joins the job (JobTracker.join), counts the rows it generated and reports its
    figures (pipeline/stages/metrics.py). It keeps the stage's class name, which names its actors
    (`MapWorker(MapBatches(TextToImageStage))`)."""

    class Counted(cls):
        def __init__(self, **kwargs):
            if not ray.get(counter.join.remote(ray.get_runtime_context().current_actor)):
                raise RuntimeError("the job ended before this stage actor started")
            super().__init__(**kwargs)
            self.actor_key = uuid.uuid4().hex

        def __call__(self, table: pa.Table) -> pa.Table:
            out = super().__call__(table)
            _count(counter, out, kind, last)
            counter.report.remote(self.actor_key, asdict(self.metrics()))
            return out

    Counted.__name__ = Counted.__qualname__ = cls.__name__
    return Counted


def _unrouted(table: pa.Table, flows: list[str], counter) -> pa.Table:
    out = route.unrouted(table, flows)
    if out.num_rows:
        _count(counter, out, progress.UNROUTED, last=True)
    return out


def ray_batch(stage: StageSpec) -> int:
    """Rows per batch handed to an actor of ``stage``: its batch size; with `batch_size: auto`,
    AUTO_MAX_BATCH on GPUs (the actor's probed size and its halvings divide it), else the size a
    CPU actor takes."""
    if stage.batch_size != "auto":
        return stage.batch_size
    return AUTO_MAX_BATCH if stage.gpus_per_actor else AUTO_START_BATCH


def block_rows(flow: list[StageSpec]) -> int:
    """Rows per block ahead of ``flow``'s stages: a multiple of every stage's batch, so that all
    of a stage's calls but its last are full; the first stage's batch where that multiple would
    be unreasonably large."""
    rows = math.lcm(*(ray_batch(s) for s in flow))
    return rows if rows <= MAX_BLOCK_ROWS else ray_batch(flow[0])


class ShardDatasink(Datasink[None]):
    """Write tasks encode their bundle (fused with the encode step before them), turn it into
    output rows and hand those to the run's ShardPublisher, which cuts the shards: so bundles are
    sized by encode time, not by the shard, and the last images are encoded in parallel as they
    come instead of in one task after the stages are done."""

    def __init__(self, publisher, rows_per_write: int):
        self.publisher = publisher
        self.rows_per_write = rows_per_write

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def write(self, blocks: Iterable[Block], ctx) -> None:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:  # every row of these blocks was done by an earlier run
            return
        rows, report = output_rows(pa.concat_tables(tables, promote_options="permissive"))
        try:
            # The task's index: a retried task's rows are taken once.
            ray.get(self.publisher.add.remote(rows, report, ctx.task_idx))
        except ray.exceptions.RayTaskError as err:
            raise err.cause from None  # the publisher's own error (storage), not Ray's wrapping


def encode_bundle_rows(spec: JobSpec) -> int:
    """Rows per write task: about ENCODE_BUNDLE_S of encoding at the job's largest output size,
    and no more than a last stage's batch, so that rows never wait for later batches to fill a
    bundle (small images would otherwise wait for a whole shard, and publishing by time with them)."""
    flows = list(spec.flow_map().values())
    pixels = max(flow[0].width * flow[0].height * math.prod(KINDS[s.kind].scale ** 2 for s in flow) for flow in flows)
    rows = int(ENCODE_BUNDLE_S / max(seconds_per_image(pixels, spec.format), 1e-9))
    return max(1, min(rows, max(ray_batch(flow[-1]) for flow in flows)))


def _exact_blocks(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """``ds`` in blocks of exactly ``rows`` rows but its last: Ray Data's streaming repartition
    (`ds.repartition(target_num_rows_per_block=rows, strict=True)`), built with the light steps'
    CPU share. Dataset.repartition takes no resource arguments: its step, fused into a step
    before it or on its own, would ask for a whole CPU and wait forever behind actor pools that
    hold the others."""
    op = StreamingRepartition(target_num_rows_per_block=rows, strict=True, input_dependencies=[ds._logical_plan.dag],
                              ray_remote_args={"num_cpus": CPU_STEP_CPUS})
    return ray.data.Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def _stages(ds: ray.data.Dataset, flow: list[StageSpec], spec: JobSpec, counter) -> ray.data.Dataset:
    """Cut ``flow``'s rows into blocks of batch multiples, prepare them and run one actor pool per
    stage."""
    rows = block_rows(flow)
    checks = {"storage": spec.storage, "access": access.for_job(spec), "limits": spec.limits}
    # Cut twice: the manifest's rows, in a step of its own (a cut fused into prepare would bundle
    # prepare's input exactly, and any step fused before it that drops rows, the flow's routing or
    # resume's done ids, would leave its blocks short), then the prepared rows, fused into
    # prepare (decoded input images can make Ray Data split its output blocks by size).
    ds = _exact_blocks(ds, rows)
    ds = _exact_blocks(ds.map_batches(prepare_batch, fn_kwargs={"flow": flow, **checks}, batch_size=rows,
                                      batch_format="pyarrow", num_cpus=CPU_STEP_CPUS), rows)
    for position, stage in enumerate(flow):
        low, high = stage.actors
        ds = ds.map_batches(
            _counted(stage_class(stage.kind), counter, stage.kind, position == len(flow) - 1),
            fn_constructor_kwargs={"spec": stage, "storage": spec.storage, "position": position,
                                   # Prompt embeddings travel on to the next stage, which reuses
                                   # them when it has the same text encoder.
                                   "keep_text_embeds": position < len(flow) - 1},
            batch_size=ray_batch(stage),
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=low, max_size=high),
            num_gpus=stage.gpus_per_actor,
            num_cpus=stage.cpus_per_actor,
        )
    return ds


def _read(spec: JobSpec, rows: int, done: DoneIds) -> ray.data.Dataset:
    """The manifest's rows, streamed, with the job's column names and without the ids in ``done``."""
    # Ray's newer Parquet reader lists files in a step that asks for a whole CPU and takes no
    # resource arguments: behind actor pools that hold most CPUs of a small node it can wait
    # forever. The classic reader runs with the CPU share given below.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    fs, path = storage.arrow_filesystem(spec.manifest, spec.storage)
    # A manifest of prompts is small: one file would arrive as one block, which one actor would
    # take whole. Blocks of about a batch each let every actor of a pool take a share.
    blocks = max(1, min(MAX_READ_BLOCKS, -(-rows // min(ray_batch(s) for s in spec.all_stages()))))
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"], num_cpus=CPU_STEP_CPUS,
                               override_num_blocks=blocks)
    names = manifest.read_names(spec, manifest.open_manifest(spec).schema.names)
    renamed = {column: name for column, name in names.items() if column != name}
    if renamed:
        ds = ds.rename_columns(renamed, num_cpus=CPU_STEP_CPUS)
    if done.filter:
        ds = ds.map_batches(done.filter, fn_kwargs=done.kwargs, batch_format="pyarrow", num_cpus=CPU_STEP_CPUS)
    return ds


def build(spec: JobSpec, rows: int, done: DoneIds, counter) -> ray.data.Dataset:
    """The whole job as one dataset; ``rows`` are to be generated, the ids in ``done`` skipped.
    ``spec`` has its resources fitted (fit_resources); ``counter`` is the job's JobTracker."""
    if spec.flows is None:
        ds = _stages(_read(spec, rows, done), spec.stages, spec, counter)
    else:
        # Each flow's branch reads the manifest and keeps its own rows before they are batched, so
        # that its calls are full; the rows of no flow take a branch of their own. Ray Data has no
        # step that splits one stream into branches: reading once would mean holding the whole
        # manifest in the object store (materialize) before the first row is generated, tens of
        # GB at 100M rows. A branch's read streams like the rest of the job, and reading prompts
        # again costs little beside generating images from them.
        names = sorted(spec.flows)
        branches = [_stages(_read(spec, rows, done).map_batches(route.rows_of, fn_kwargs={"flow": name},
                                                                batch_format="pyarrow", num_cpus=CPU_STEP_CPUS),
                            spec.flows[name], spec, counter)
                    for name in names]
        unrouted = _read(spec, rows, done).map_batches(_unrouted, fn_kwargs={"flows": names, "counter": counter},
                                                       batch_format="pyarrow", num_cpus=CPU_STEP_CPUS)
        ds = unrouted.union(*branches)
    ds = ds.map_batches(encode_batch, fn_kwargs={"fmt": spec.format}, batch_format="pyarrow", num_cpus=CPU_STEP_CPUS)
    if spec.filters:  # per-row scores; the filters decide once the whole output is written
        ds = ds.map_batches(score_batch, fn_kwargs={"filters": spec.filters}, batch_format="pyarrow",
                            num_cpus=CPU_STEP_CPUS)
    return ds


def _no_progress(err: ExecutionTimeoutError) -> str:
    """Ray Data's no-progress give-up in a user's words, with the steps it names as waiting."""
    waiting = [line.strip(" -") for line in str(err).splitlines() if line.startswith("  - ")]
    timeout = ray.data.DataContext.get_current().execution_no_progress_timeout_s
    return (f"the job made no progress for {timeout:g} s and Ray Data stopped it (waiting: {'; '.join(waiting)}). "
            "A stage's actors may fit on no node of the cluster (cpus_per_actor, gpus_per_actor), or the "
            "capacity it waited for never came; RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S sets the wait (-1: "
            "forever). The rows finished before are published: run the job again to resume it")


@dataclass
class Executed:
    """What a run did: each write task's report and each stage actor's figures."""

    reports: list[ShardReport] = field(default_factory=list)
    actors: list[ActorMetrics] = field(default_factory=list)


def execute(spec: JobSpec, rows: int, run_id: str, done: pa.Array, totals: dict[str, int],
            verbose: bool = False, log=print) -> Executed:
    """Run the whole job, skipping the ids in ``done``; return what each write task wrote and
    what each stage actor measured. ``totals`` are the rows each stage kind will see, for the
    progress line."""
    ensure_ray(verbose)
    have_cpu, have_gpu, node_cpu = cluster_resources()
    spec = fit_resources(spec, have_cpu, have_gpu, node_cpu)
    check_fits(spec, have_cpu, have_gpu, log)
    skip = DoneIds(done, log)
    # On the driver's node: stage actors join it as they start, so it must outlive any worker
    # node a job can lose (a job that loses the driver's node is lost anyway).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = JobTracker.options(scheduling_strategy=here).remote()
    writer = ShardWriter(spec.output, spec.storage, run_id, spec.format.rows_per_shard,
                         publish_every_s=spec.format.publish_every_minutes * 60)
    publisher = ShardPublisher.options(scheduling_strategy=here).remote(writer)
    sink = ShardDatasink(publisher, encode_bundle_rows(spec))
    try:
        with progress.Progress(rows, totals, lambda: ray.get(counter.get.remote(), timeout=READ_COUNTS_S), log):
            build(spec, rows, skip, counter).write_datasink(sink, ray_remote_args={"num_cpus": CPU_STEP_CPUS})
        report = ray.get(publisher.finish.remote())
        actors = [ActorMetrics(**m) for m in ray.get(counter.actor_figures.remote())]
    except KeyboardInterrupt:
        # The rows the publisher holds are done work: publish them, so a resume skips them.
        ray.get(publisher.finish.remote(), timeout=PUBLISH_ON_INTERRUPT_S)
        raise
    except ExecutionTimeoutError as err:
        ray.get(publisher.finish.remote(), timeout=PUBLISH_ON_INTERRUPT_S)
        raise NoProgressError(_no_progress(err)) from err
    except ray.exceptions.RayTaskError as err:
        # A task's own error (a shard write that ran out of storage retries) reaches the user as
        # itself, not inside Ray's worker traceback.
        if isinstance(err.cause, ShardgenError):
            raise err.cause from err
        raise
    finally:
        for actor in ray.get(counter.end.remote()):
            ray.kill(actor)
        ray.kill(counter)
        ray.kill(publisher)
        skip.close()
    return Executed([report], actors)
