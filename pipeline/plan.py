"""The plan builder: the only module that knows Ray Data.

read manifest -> prepare (CPU) -> one actor pool per diffusion stage -> encode (CPU) -> write.
Stages chain in one streaming job; images pass between them in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from pipeline import access, storage
from pipeline.encode import encode_batch
from pipeline.errors import ShardgenError, SpecError
from pipeline.prepare import prepare_batch, unrouted_batch
from pipeline.resume import drop_done
from pipeline.sink import ShardReport, ShardWriter
from pipeline.spec import JobSpec, StageSpec
from pipeline.stages import stage_class

# Reading, prepare, encode and writing are light next to diffusion: a quarter CPU each lets them
# run beside actor pools that reserve most CPUs of a node (a task that asked for a whole CPU
# could wait forever behind actors that wait for its rows).
CPU_STEP_CPUS = 0.25
MAX_READ_BLOCKS = 4096


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (or the one this job was submitted to), else start
    a local Ray."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)


def check_fits(spec: JobSpec, log=print) -> None:
    """Every pool starts its minimum actors at once; if they cannot all fit beside the light CPU
    steps, the job would wait forever. Refuse such a job on a fixed cluster; on one that may
    grow (an autoscaler), say so and go on."""
    stages = spec.all_stages()
    need_cpu = sum(s.actors[0] * s.cpus_per_actor for s in stages) + CPU_STEP_CPUS
    need_gpu = sum(s.actors[0] * _gpus(s) for s in stages)
    have = ray.cluster_resources()
    have_cpu, have_gpu = have.get("CPU", 0), have.get("GPU", 0)
    if need_cpu <= have_cpu and need_gpu <= have_gpu:
        return
    message = (f"the stages' minimum actors need {need_cpu:g} CPUs and {need_gpu:g} GPUs (with "
               f"{CPU_STEP_CPUS} CPU for reading and encoding), the cluster has {have_cpu:g} CPUs and "
               f"{have_gpu:g} GPUs: lower actors, cpus_per_actor or gpus_per_actor")
    if os.environ.get("SHARDGEN_AUTOSCALING"):
        log(f"shardgen: warning: {message}; waiting for the autoscaler")
    else:
        raise SpecError(f"{message} (set SHARDGEN_AUTOSCALING=1 where the cluster grows on demand)")


class ShardDatasink(Datasink[ShardReport]):
    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self.reports: list[ShardReport] = []

    @property
    def min_rows_per_write(self) -> int:
        # Bundle rows so that shards come out near rows_per_shard rows, not one per batch.
        return self.writer.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx) -> ShardReport:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:  # every row of these blocks was done by an earlier run
            return ShardReport()
        return self.writer.write(pa.concat_tables(tables, promote_options="permissive"), ctx.task_idx)

    def on_write_complete(self, write_result) -> None:
        self.reports = list(write_result.write_returns)


def _gpus(stage: StageSpec) -> float:
    if stage.gpus_per_actor is not None:
        return stage.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _flow(ds: ray.data.Dataset, flow: list[StageSpec], spec: JobSpec) -> ray.data.Dataset:
    ds = ds.map_batches(prepare_batch,
                        fn_kwargs={"flow": flow, "storage": spec.storage, "access": access.for_job(spec),
                                   "limits": spec.limits},
                        batch_format="pyarrow", num_cpus=CPU_STEP_CPUS)
    for position, stage in enumerate(flow):
        low, high = stage.actors
        ds = ds.map_batches(
            stage_class(stage.kind),
            fn_constructor_kwargs={"spec": stage, "storage": spec.storage, "position": position,
                                   # Prompt embeddings travel on to the next stage, which reuses
                                   # them when it has the same text encoder.
                                   "keep_text_embeds": position < len(flow) - 1},
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=low, max_size=high),
            num_gpus=_gpus(stage),
            num_cpus=stage.cpus_per_actor,
        )
    return ds


def build(spec: JobSpec, rows: int, done: pa.Array) -> ray.data.Dataset:
    """The whole job as one dataset; ``rows`` are to be generated, the ids in ``done`` skipped."""
    # Ray's newer Parquet reader lists files in a step that asks for a whole CPU and takes no
    # resource arguments: behind actor pools that hold most CPUs of a small node it can wait
    # forever. The classic reader runs with the CPU share given below.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    fs, path = storage.arrow_filesystem(spec.manifest, spec.storage)
    # A manifest of prompts is small: one file would arrive as one block, which one actor would
    # take whole. Blocks of about a batch each let every actor of a pool take a share.
    blocks = max(1, min(MAX_READ_BLOCKS, -(-rows // min(s.batch_size for s in spec.all_stages()))))
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"], num_cpus=CPU_STEP_CPUS,
                               override_num_blocks=blocks)
    if len(done):
        ds = ds.map_batches(drop_done, fn_kwargs={"done": done}, batch_format="pyarrow", num_cpus=CPU_STEP_CPUS)
    if spec.flows is None:
        ds = _flow(ds, spec.stages, spec)
    else:
        names = sorted(spec.flows)
        branches = [_flow(ds.filter(lambda row, name=name: row["task"] == name, num_cpus=CPU_STEP_CPUS),
                          spec.flows[name], spec)
                    for name in names]
        unrouted = ds.filter(lambda row: row["task"] not in names, num_cpus=CPU_STEP_CPUS).map_batches(
            unrouted_batch, fn_kwargs={"flows": names}, batch_format="pyarrow", num_cpus=CPU_STEP_CPUS)
        ds = branches[0].union(*branches[1:], unrouted)
    return ds.map_batches(encode_batch, fn_kwargs={"fmt": spec.format}, batch_format="pyarrow", num_cpus=CPU_STEP_CPUS)


def execute(spec: JobSpec, rows: int, run_id: str, done: pa.Array) -> list[ShardReport]:
    """Run the whole job, skipping the ids in ``done``; return what each write task wrote."""
    ensure_ray()
    check_fits(spec)
    sink = ShardDatasink(ShardWriter(spec.output, spec.storage, run_id, spec.format.rows_per_shard))
    try:
        build(spec, rows, done).write_datasink(sink, ray_remote_args={"num_cpus": CPU_STEP_CPUS})
    except ray.exceptions.RayTaskError as err:
        # A task's own error (a shard write that ran out of storage retries) reaches the user as
        # itself, not inside Ray's worker traceback.
        if isinstance(err.cause, ShardgenError):
            raise err.cause from err
        raise
    return sink.reports
