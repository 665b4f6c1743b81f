"""`shardgen`: run or validate a job, run the demo, make manifests, build the built-in models. Parses,
then calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.errors import EXIT_FAILED, ShardgenError


def _run(args: argparse.Namespace) -> int:
    from pipeline.job import exit_code, load_spec, run_job, summary_line
    from pipeline.nightly import record

    spec = load_spec(args.spec, night=args.date, manifest=args.manifest, output=args.output)
    stats = run_job(spec, overwrite=args.overwrite, verbose=args.verbose)
    record(spec, stats)
    print(summary_line(spec, stats))
    return exit_code(spec, stats)


def _submit(args: argparse.Namespace) -> int:
    from pipeline import submit

    return submit.command(args)


def _nightly(args: argparse.Namespace) -> int:
    """Catch up the nights of a spec, locally or on a cluster (--address). It sits here, above
    both nightly and submit, so that neither imports the other back."""
    from pipeline import dates, submit
    from pipeline.errors import EXIT_OK, SpecError
    from pipeline.nightly import catch_up, first_night, load_nights, outcome_table, run_local

    overrides = {"manifest": args.manifest, "output": args.output}
    last = dates.parse_night(args.to)
    if args.from_:
        first = dates.parse_night(args.from_)
    elif args.missing:
        root, (night,) = load_nights(args.spec, [last], **overrides)
        first = min(first_night(root, night.spec.storage) or last, last)
    else:
        raise SpecError("--from: give the first night, or --missing for every night since the first one")
    run = submit.run_remote(submit.client(args.address), args.spec, args.working_dir, overrides) \
        if args.address else run_local
    outcomes = catch_up(args.spec, first, last, run, args.missing, **overrides)
    print(outcome_table(outcomes) if outcomes else f"shardgen nightly: every night from {first} to {last} is complete")
    return next((o.code for o in outcomes if o.code != EXIT_OK and o.status != "running"), EXIT_OK)


def _validate(args: argparse.Namespace) -> int:
    from pipeline.job import load_spec
    from pipeline.validate import validate

    validate(load_spec(args.spec, night=args.date, manifest=args.manifest, output=args.output))
    return 0


def _spec_schema(args: argparse.Namespace) -> int:
    from pipeline.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _manifest_from(args: argparse.Namespace) -> int:
    from pipeline.manifest_from import manifest_from

    manifest_from(args.file, args.output)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import demo_spec
    from pipeline.job import exit_code, run_job, summary_line
    from pipeline.models.resolve import resolve

    start = time.perf_counter()
    spec = demo_spec(Path(args.output).absolute(), args.rows)
    for stage in spec.all_stages():
        resolve(stage.model)
    stats = run_job(spec, overwrite=True, verbose=args.verbose)
    print(summary_line(spec, stats))
    print(f"shardgen demo: manifest {spec.manifest}; dataset {spec.output} "
          f"(look: shardgen inspect {spec.output}); wall time {time.perf_counter() - start:.1f} s")
    return exit_code(spec, stats)


def _models_build(args: argparse.Namespace) -> int:
    from pipeline.models.resolve import build_builtin, builtin_names

    for name in args.names or builtin_names():
        print(f"builtin:{name} -> {build_builtin(name)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect.summary import inspect

    if args.html:
        from pipeline.inspect.report import write_report

        print(write_report(args.output, args.html, where=args.where, sample=args.sample, seed=args.seed))
        return 0
    print(inspect(args.output, args.rows, args.save, where=args.where, as_json=args.json))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.verify import main as verify_main

    return verify_main(args.output, manifest=args.manifest, deep=args.deep or args.sample is not None,
                       sample=args.sample, seed=args.seed)


def _bench(args: argparse.Namespace) -> int:
    if args.gpu:
        from pipeline import gpubench

        gpubench.run(args.quick, args.json)
        return 0
    from pipeline import bench

    bench.main(args.rows, args.json, args.steps, quick=args.quick, rounds=args.rounds)
    return 0


def _manifest_synth(args: argparse.Namespace) -> int:
    from pipeline.errors import SpecError
    from pipeline.synth import control_maps
    from pipeline.synth.manifest import main

    if args.control_maps:  # one row per label map; the classes present make the prompt
        table = control_maps.main(args.control_maps, args.classes, args.templates, args.seed, args.splits,
                                  args.output)
    elif args.templates is None or args.per_class is None:
        raise SpecError("manifest synth: --templates and --per-class are needed (or --control-maps DIR)")
    else:
        table = main(args.classes, args.templates, args.per_class, args.seed, args.splits, args.output,
                     args.guidance, args.guidance_range)
    print(f"shardgen: {table.num_rows} rows -> {args.output}")
    return 0


def _export_webdataset(args: argparse.Namespace) -> int:
    from pipeline.export import export_webdataset

    summary = export_webdataset(args.output, args.dest, args.rows_per_shard, args.include_filtered)
    print(f"shardgen: exported {args.output} -> {args.dest}: {summary}")
    return 0


VERBOSE_HELP = "also show Ray Data's progress, Ray's notices and the workers' output (model loading, warnings)"


def _version() -> str:
    try:
        return version("shardgen")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True)
    p.add_argument("--manifest", help="override the spec's manifest URI")
    p.add_argument("--output", help="override the spec's output URI")
    p.add_argument("--date", help="the night (UTC YYYY-MM-DD) for {date} and {yesterday} in the spec; default today")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardgen", description="Dataset-scale image generation on Ray Data.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"shardgen {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", allow_abbrev=False, help="run a job spec (YAML or JSON, local path or s3:// URI)")
    _spec_arguments(run)
    run.add_argument("--overwrite", action="store_true", help="delete the output first and start again")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(fn=_run)

    night_help = "override the spec's %s URI ({date} and {yesterday} are filled in)"
    submit = sub.add_parser("submit", allow_abbrev=False,
                            help="submit one night of a spec to a Ray cluster's Jobs API, once (cluster/README.md)")
    submit.add_argument("--spec", required=True, help="where the cluster reads the spec (s3://…, or in --working-dir)")
    submit.add_argument("--date", help="the night (UTC YYYY-MM-DD, today or yesterday); default today")
    submit.add_argument("--address", help="the Jobs API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--working-dir", help="ship this folder as the job's code (default: the installed package)")
    submit.add_argument("--manifest", help=night_help % "manifest")
    submit.add_argument("--output", help=night_help % "output")
    submit.add_argument("--wait", action="store_true", help="follow the log; exit with the job's own exit code")
    submit.set_defaults(fn=_submit)

    nightly = sub.add_parser("nightly", allow_abbrev=False,
                             help="run or submit every night of a range that is not complete, in date order")
    nightly.add_argument("--spec", required=True)
    nightly.add_argument("--from", dest="from_", metavar="FROM", help="the first night (UTC YYYY-MM-DD)")
    nightly.add_argument("--to", help="the last night (default today)")
    nightly.add_argument("--missing", action="store_true",
                         help="list only nights without _SUCCESS; without --from, since the first night at the root")
    nightly.add_argument("--address", help="submit to this Jobs API and wait for each night (default: run here)")
    nightly.add_argument("--working-dir", help="with --address: ship this folder as the jobs' code")
    nightly.add_argument("--manifest", help=night_help % "manifest")
    nightly.add_argument("--output", help=night_help % "output")
    nightly.set_defaults(fn=_nightly)

    check = sub.add_parser("validate", allow_abbrev=False,
                           help="check a job spec without generating: spec, manifest, models, resources, the plan")
    _spec_arguments(check)
    check.set_defaults(fn=_validate)

    spec = sub.add_parser("spec", allow_abbrev=False, help="the job spec's format")
    spec.add_argument("--schema", action="store_true", required=True,
                      help="print the spec's JSON Schema (for editors and the YAML language server)")
    spec.set_defaults(fn=_spec_schema)

    manifest = sub.add_parser("manifest", allow_abbrev=False, help="make manifests")
    manifest_sub = manifest.add_subparsers(dest="manifest_command", required=True)
    convert = manifest_sub.add_parser(
        "from", allow_abbrev=False,
        help="a text file of prompts (one a line), CSV or JSONL (local or s3://) to a Parquet manifest")
    convert.add_argument("file")
    convert.add_argument("--output", help="the Parquet manifest to write (default: FILE with .parquet)")
    convert.set_defaults(fn=_manifest_from)

    demo = sub.add_parser("demo", allow_abbrev=False, help="run the embedded default job (local Ray, built-in models)")
    demo.add_argument("--output", default="demo-output", help="folder for the manifest and the dataset")
    demo.add_argument("--rows", type=int, default=32)
    demo.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    demo.set_defaults(fn=_demo)

    look = sub.add_parser("inspect", allow_abbrev=False,
                          help="summarise an output dataset: counts, errors, times, sizes, models, shards, first rows")
    look.add_argument("output")
    look.add_argument("--rows", type=int, default=5, help="how many of the first rows to show")
    look.add_argument("--save", help="also save the images of the rows shown into this folder")
    look.add_argument("--where", help="a DuckDB SQL condition on the output's columns, e.g. \"status = 'error'\"")
    look.add_argument("--json", action="store_true", help="print the summary as JSON")
    look.add_argument("--html", help="write a self-contained HTML report (summary, thumbnails, charts) to this file")
    look.add_argument("--sample", type=int, default=48, help="--html: thumbnails sampled across shards")
    look.add_argument("--seed", type=int, default=0, help="--html: seed of the thumbnail sample")
    look.set_defaults(fn=_inspect)

    check = sub.add_parser("verify", allow_abbrev=False,
                           help="check an output dataset: _SUCCESS, footers, schema, counts, ids, images")
    check.add_argument("output")
    check.add_argument("--manifest", help="also check that every id of this manifest is in the output once")
    check.add_argument("--deep", action="store_true",
                       help="also read the images: sha256, full decode, width and height")
    check.add_argument("--sample", type=int,
                       help="read this many images, sampled across shards, instead of every one (implies --deep)")
    check.add_argument("--seed", type=int, default=0, help="--sample: seed of the sample")
    check.set_defaults(fn=_verify)

    bench = sub.add_parser("bench", allow_abbrev=False,
                           help="steady throughput against a plain diffusers loop (prints figures)")
    bench.add_argument("--rows", type=int, default=192)
    bench.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    bench.add_argument("--rounds", type=int, default=4, help="rounds per pair, the rows cut into as many parts: "
                       "the plain loop and shardgen back to back on each part, the pair's ratio the median")
    bench.add_argument("--json", help="also write the figures to this file")
    bench.add_argument("--gpu", action="store_true",
                       help="SD 1.5 and SDXL architectures (random weights): plain loop, compiled loop, shardgen")
    bench.add_argument("--quick", action="store_true", help="with --gpu: tiny models of the same architectures; "
                       "without: only the first pair (the CPU default against its plain loop)")
    bench.set_defaults(fn=_bench)

    # Listed for --help only: main() hands `train …` whole to the training entry point.
    sub.add_parser("train", allow_abbrev=False,
                   help="train or evaluate the shape models: shardgen train {vae,t2i,sr,inpaint,all,eval} …")

    synth = manifest_sub.add_parser("synth", allow_abbrev=False,
                                    help="classes x prompt templates x seeds, balanced, split, labelled")
    synth.add_argument("--classes", required=True, help="YAML/JSON/CSV of classes (name, synonyms, description)")
    synth.add_argument("--templates", help="YAML/JSON (templates, slots, distinct) or .txt (with --control-maps: "
                       "optional, {class} names the classes present)")
    synth.add_argument("--per-class", type=int, help="rows per class (not with --control-maps)")
    synth.add_argument("--control-maps", help="a folder of label-map PNGs (class indices): one row each, with the "
                       "colour-coded control_image and the label_map as target")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--splits", default="train=0.8,validation=0.1,test=0.1")
    synth.add_argument("--guidance", help="guidance_scale values, comma-separated, balanced over each class's rows")
    synth.add_argument("--guidance-range", help="a:b, guidance_scale drawn uniformly per row")
    synth.add_argument("--output", required=True, help="the manifest to write (.parquet, local or s3://)")
    synth.set_defaults(fn=_manifest_synth)

    export = sub.add_parser("export", allow_abbrev=False, help="a finished output in another format")
    export_sub = export.add_subparsers(dest="export_command", required=True)
    wds = export_sub.add_parser("webdataset", allow_abbrev=False,
                                help="WebDataset tar shards {split}-000000.tar (key.png, key.cls, key.json); resumable")
    wds.add_argument("output", help="a finished shardgen output (local or s3://)")
    wds.add_argument("dest", help="the folder for the tar shards (local or s3://)")
    wds.add_argument("--rows-per-shard", type=int, default=1000)
    wds.add_argument("--include-filtered", action="store_true", help="also export rows with status: filtered")
    wds.set_defaults(fn=_export_webdataset)

    models = sub.add_parser("models", allow_abbrev=False, help="built-in models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", allow_abbrev=False, help="build the built-in models into the cache")
    build.add_argument("names", nargs="*", help="built-in names (default: all)")
    build.set_defaults(fn=_models_build)
    return p


def main(argv: list[str] | None = None) -> int:
    """The `shardgen` command; its exit status. A reader that closes the pipe early (`| head`)
    ends it quietly: no traceback, now or at exit."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe could not be caught
        return code
    except BrokenPipeError:
        # The flush at exit would fail again: leave it nothing to write to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from pipeline.training.__main__ import main as training_main

        training_main(argv[1:])
        return 0
    args = parser().parse_args(argv)
    # Progress lines must reach a log as they happen, not when a block buffer fills.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if not getattr(args, "verbose", False):
        from pipeline.progress import quiet_libraries

        quiet_libraries()
    try:
        return args.fn(args)
    except ShardgenError as err:
        print(f"shardgen: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("shardgen: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
