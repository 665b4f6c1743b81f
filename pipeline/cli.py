"""`shardgen`: run a job, run the demo, build the built-in models. Parses, then calls the library."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.errors import EXIT_FAILED, ShardgenError


def _run(args: argparse.Namespace) -> int:
    from pipeline.job import exit_code, load_spec, run_job, summary_line

    spec = load_spec(args.spec, manifest=args.manifest, output=args.output)
    stats = run_job(spec, overwrite=args.overwrite)
    print(summary_line(spec, stats))
    return exit_code(spec, stats)


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import demo_spec
    from pipeline.job import exit_code, run_job, summary_line
    from pipeline.models.resolve import resolve

    start = time.perf_counter()
    spec = demo_spec(Path(args.output).absolute(), args.rows)
    for stage in spec.all_stages():
        resolve(stage.model)
    stats = run_job(spec, overwrite=True)
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
    from pipeline.inspect_output import inspect

    print(inspect(args.output, args.rows, args.save))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.gpu:
        from pipeline import gpubench

        gpubench.run(args.quick, args.json)
        return 0
    from pipeline import bench

    bench.main(args.rows, args.json)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardgen", description="Dataset-scale image generation on Ray Data.",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", allow_abbrev=False, help="run a job spec (YAML or JSON, local path or s3:// URI)")
    run.add_argument("--spec", required=True)
    run.add_argument("--manifest", help="override the spec's manifest URI")
    run.add_argument("--output", help="override the spec's output URI")
    run.add_argument("--overwrite", action="store_true", help="delete the output first and start again")
    run.set_defaults(fn=_run)

    demo = sub.add_parser("demo", allow_abbrev=False, help="run the embedded default job (local Ray, built-in models)")
    demo.add_argument("--output", default="demo-output", help="folder for the manifest and the dataset")
    demo.add_argument("--rows", type=int, default=32)
    demo.set_defaults(fn=_demo)

    look = sub.add_parser("inspect", allow_abbrev=False,
                          help="summarise an output dataset: stats, columns, errors, first rows")
    look.add_argument("output")
    look.add_argument("--rows", type=int, default=5)
    look.add_argument("--save", help="also save the first rows' images into this folder")
    look.set_defaults(fn=_inspect)

    bench = sub.add_parser("bench", allow_abbrev=False,
                           help="steady throughput against a plain diffusers loop (prints figures)")
    bench.add_argument("--rows", type=int, default=96)
    bench.add_argument("--json", help="also write the figures to this file")
    bench.add_argument("--gpu", action="store_true",
                       help="SD 1.5 and SDXL architectures (random weights): plain loop, compiled loop, shardgen")
    bench.add_argument("--quick", action="store_true", help="with --gpu: tiny models of the same architectures")
    bench.set_defaults(fn=_bench)

    # Listed for --help only: main() hands `train …` whole to the training entry point.
    sub.add_parser("train", allow_abbrev=False,
                   help="train or evaluate the shape models: shardgen train {vae,t2i,sr,inpaint,all,eval} …")

    models = sub.add_parser("models", allow_abbrev=False, help="built-in models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", allow_abbrev=False, help="build the built-in models into the cache")
    build.add_argument("names", nargs="*", help="built-in names (default: all)")
    build.set_defaults(fn=_models_build)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from pipeline.training.__main__ import main as training_main

        training_main(argv[1:])
        return 0
    args = parser().parse_args(argv)
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
