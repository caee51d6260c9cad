"""`gatelab`: argument parsing and dispatch only; the work is in the modules it calls.

Every bad input a user can fix raises LabError, which ends here as one line on stderr
and exit code 2, before any MLflow run is created.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import warnings

from lab.errors import LabError

EXAMPLES = {
    "train": "gatelab train --variant sdpa_elementwise_sigmoid_mul --preset tiny --data synthetic "
             "--tokens 2e5 --set train.lr=3e-3",
    "ui": "gatelab ui --port 5000",
    "variants": "gatelab variants --preset small --json",
    "demo": "gatelab demo",
    "bench": "gatelab bench --preset base,medium --variants baseline,sdpa_elementwise_sigmoid_mul "
             "--lab-variants baseline --steps 30",
    "export": "gatelab export 3f2a9c0d1e4b4f6e8a7b5c4d3e2f1a0b --format hf --out exports/gated-tiny",
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


def cmd_demo(args) -> int:
    from lab.config import resolve
    from lab.run import describe, train_run

    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", data="synthetic", tokens=2e5)
    result = train_run(config, args.tracking_uri, experiment="demo", quiet=args.quiet)
    print(describe(result))
    print("Browse it: gatelab ui   (then open http://127.0.0.1:5000)")
    return 0


def cmd_bench(args) -> int:
    import datetime
    from pathlib import Path

    from lab.bench import run_bench

    out = Path(args.out) if args.out else Path("benchmarks") / (
        f"{datetime.date.today().isoformat()}-{args.preset.replace(',', '_')}-x{args.devices}.json")
    run_bench(args.preset.split(","), args.variants.split(","), args.steps, args.warmup, args.data,
              args.overrides, args.devices, [v for v in args.lab_variants.split(",") if v], out,
              args.tracking_uri)
    return 0


def cmd_export(args) -> int:
    from lab.export import export

    result = export(args.run, args.out, fmt=args.format, dtype=args.dtype, tokenizer=args.tokenizer,
                    force=args.force)
    print(result.describe())
    return 0


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

    p = _parser(sub, "demo", "the main job on the synthetic corpus, on CPU in a few minutes")
    _add_tracking(p)
    p.set_defaults(func=cmd_demo)

    p = _parser(sub, "bench", "measure tokens/s, MFU, peak memory and gate overhead "
                "(bare compiled loop vs the full lab path)")
    p.add_argument("--preset", default="base,medium", help="comma-separated presets")
    p.add_argument("--variants", default="baseline,sdpa_elementwise_sigmoid_mul,sdpa_headwise_sigmoid_mul")
    p.add_argument("--lab-variants", default="baseline",
                   help="variants also timed through the full lab path (Lightning + MLflow)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    p.add_argument("--devices", type=int, default=1, help="GPUs: >1 times the lab path under DDP")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="JSON output (default benchmarks/<date>-<presets>-x<devices>.json)")
    p.add_argument("--tracking-uri", help="store for the lab-path runs (default: a temporary one)")
    p.set_defaults(func=cmd_bench)
    p = _parser(sub, "export", "write a run's checkpoint as a Hugging Face Qwen3 model "
                "(baseline, sdpa headwise / elementwise gates)")
    p.add_argument("run", help="an MLflow run id (its checkpoint in the store), a checkpoint "
                   "directory, or a .ckpt file")
    p.add_argument("--format", default="hf", help="output format; hf: transformers Qwen3 with the "
                   "reference gate flags, safetensors weights and the tokenizer")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 weights")
    p.add_argument("--tokenizer", help="tokenizer.json to ship (default: the run's corpus tokenizer)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_export)
    return parser


def quiet_libraries() -> None:
    """--quiet: the libraries' INFO chatter off (device banners, tips, schema creation);
    their warnings and errors stay. Lightning sets its loggers to INFO when imported, so
    it is imported first; MLflow reads its level from the environment when imported."""
    import lightning  # noqa: F401

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("lightning.pytorch", "lightning.fabric", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning):  # library internals, nothing to act on
        warnings.filterwarnings("ignore", category=category, module="lightning")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        return args.func(args)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
