"""`gatelab`: argument parsing and dispatch only; the work is in the modules it calls.

Every bad input a user can fix raises LabError, which ends here as one line on stderr
and exit code 2, before any MLflow run is created.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from lab.errors import LabError

EXAMPLES = {
    "train": "gatelab train --variant sdpa_elementwise_sigmoid_mul --preset tiny --data synthetic "
             "--tokens 2e5 --set train.lr=3e-3",
    "ui": "gatelab ui --port 5000",
    "variants": "gatelab variants --preset small --json",
    "demo": "gatelab demo",
    "grid": "gatelab grid ablations/smoke.yaml --seeds 0,1 --dry-run",
    "report": "gatelab report smoke --out reports/smoke",
}


def _parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text,
                          epilog=f"example:\n  {EXAMPLES[name]}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                        "else sqlite:///mlruns/mlflow.db)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (CI, scripts)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset (see `gatelab variants`)")
    parser.add_argument("--data", default=None,
                        help="synthetic, a prepared corpus directory, or text files (comma-separated)")
    parser.add_argument("--tokens", type=float, default=None, help="training token budget, e.g. 2e5")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field: model.*, train.*, data.* or gate.*")


# --- commands ----------------------------------------------------------------------

def cmd_train(args) -> int:
    from lab.config import resolve
    from lab.gates import custom_variant, parse_gate
    from lab.run import describe, train_run

    variant = custom_variant(parse_gate(args.gate)) if args.gate else args.variant
    config = resolve(variant, args.preset, args.overrides, data=args.data, tokens=args.tokens,
                     seed=args.seed, lr=args.lr)
    result = train_run(config, args.tracking_uri, experiment=args.experiment, quiet=args.quiet)
    print(describe(result))
    return 0


def cmd_ui(args) -> int:
    from lab import tracking

    uri = tracking.tracking_uri(args.tracking_uri)
    artifacts = (tracking.store_dir() / "artifacts").as_uri()
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {url} (store: {uri}); Ctrl-C stops it", flush=True)
    # A light server: one worker, and MLflow's background job runner off.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--default-artifact-root", artifacts, "--host", args.host, "--port", str(args.port),
               "--workers", "1"]
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


def cmd_variants(args) -> int:
    from lab.variants import print_variants

    print_variants(args.preset, as_json=args.json, gate=args.gate)
    return 0


def cmd_grid(args) -> int:
    from lab.grid import GridOptions, describe_summary, load_grid, run_grid, with_cli

    spec = with_cli(load_grid(args.file), preset=args.preset, data=args.data, tokens=args.tokens,
                    seeds=args.seeds, lrs=args.lrs, variants=args.variants,
                    overrides=args.overrides)
    options = GridOptions(gpus=args.gpus, cpu_workers=args.cpu_workers,
                          cpu_threads=args.cpu_threads, dry_run=args.dry_run,
                          tracking_uri=args.tracking_uri, shard=args.shard, quiet=args.quiet,
                          stale_after_s=args.stale_after)
    try:
        summary = run_grid(spec, options)
    except KeyboardInterrupt:
        print(f"grid {spec.name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    print(describe_summary(summary))
    return 1 if summary.failed else 0


def cmd_report(args) -> int:
    from lab.report import build_report

    report = build_report(args.grid, args.tracking_uri, args.out)
    print(report.markdown)
    print(f"\nwritten to {report.out_dir} (and logged to the grid's parent run)")
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from lab.grid import GridOptions, describe_summary, load_grid, run_grid
    from lab.report import build_report

    spec = load_grid(Path(__file__).resolve().parents[1] / "ablations" / "smoke.yaml")
    # Two one-thread workers: a tiny model gains nothing from a second intra-op thread.
    workers = args.cpu_workers or min(2, os.cpu_count() or 1)
    summary = run_grid(spec, GridOptions(tracking_uri=args.tracking_uri, quiet=args.quiet,
                                         cpu_workers=workers, cpu_threads=1))
    print(describe_summary(summary))
    print(build_report(spec.name, args.tracking_uri).markdown)
    print("Browse it: gatelab ui   (then open http://127.0.0.1:5000)")
    return 1 if summary.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatelab", description="Gated-attention ablation lab "
                                     "(Qiu et al., 2025): train, sweep and compare gate variants.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _parser(sub, "train", "train one model and record it in MLflow")
    p.add_argument("--variant", default="baseline", help="a variant slug (`gatelab variants`)")
    p.add_argument("--gate", help="a gate by axes instead of a slug, e.g. "
                   "position=sdpa,granularity=headwise,form=additive,activation=silu")
    p.add_argument("--experiment", default="gatelab", help="MLflow experiment name")
    _add_run_options(p)
    _add_tracking(p)
    p.set_defaults(func=cmd_train)

    p = _parser(sub, "ui", "serve the MLflow UI on the local store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--tracking-uri")
    p.set_defaults(func=cmd_ui)

    p = _parser(sub, "variants", "list every variant with its axes and added parameters")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--gate", help="describe one point of the gate space by axes")
    p.set_defaults(func=cmd_variants)

    p = _parser(sub, "grid", "run an ablation grid (variants x LRs x seeds), resumable, into MLflow")
    p.add_argument("file", help="grid file, e.g. ablations/core.yaml")
    p.add_argument("--preset", help="replace the file's preset")
    p.add_argument("--data", help="replace the file's data source")
    p.add_argument("--tokens", help="replace the file's token budget, e.g. 2e5")
    p.add_argument("--seeds", help="replace the file's seeds, e.g. 0,1,2")
    p.add_argument("--lrs", help="replace the file's learning rates, e.g. 1e-3,3e-3")
    p.add_argument("--variants", help="replace the file's variants: slugs, comma-separated, or all")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="add a config override for every cell")
    p.add_argument("--gpus", help="all (default) or CUDA indices, e.g. 0,1: one worker per GPU")
    p.add_argument("--cpu-workers", type=int, default=1,
                   help="cells trained at once without GPUs (default 1)")
    p.add_argument("--cpu-threads", type=int,
                   help="torch threads per CPU worker (default: cores / workers)")
    p.add_argument("--shard", help="run only shard i of n (i/n), for grids spread over machines")
    p.add_argument("--stale-after", type=float, default=600.0,
                   help="seconds without a heartbeat after which another host's run counts as "
                   "dead (default 600)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cells, parameter counts and a time estimate; run nothing")
    _add_tracking(p)
    p.set_defaults(func=cmd_grid)

    p = _parser(sub, "report", "compare the variants of a grid: tables (Markdown, CSV) and plots")
    p.add_argument("grid", help="grid name (the MLflow experiment)")
    p.add_argument("--out", help="output folder (default reports/<grid>)")
    p.add_argument("--tracking-uri")
    p.set_defaults(func=cmd_report)

    p = _parser(sub, "demo", "the smoke grid on the synthetic corpus and its report, on CPU in "
                "a few minutes")
    p.add_argument("--cpu-workers", type=int, help="cells trained at once (default: 2, or 1 "
                   "on a one-core machine)")
    _add_tracking(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
