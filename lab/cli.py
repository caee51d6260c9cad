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
    "prepare": "gatelab prepare --data 'gutenberg-en/train-*.txt.xz' --valid gutenberg-en/valid.txt.xz "
               "--test gutenberg-en/test.txt.xz --vocab-size 16384",
    "ui": "gatelab ui --port 5000",
    "variants": "gatelab variants --preset small --json",
    "demo": "gatelab demo",
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
                        help="synthetic, a prepared corpus directory (`gatelab prepare`), or "
                        "text files/globs (comma-separated)")
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


def cmd_prepare(args) -> int:
    from lab.corpus import describe, prepare

    log = None if args.quiet else (lambda message: print(message, flush=True))
    prepared = prepare(args.data, args.vocab_size, args.valid, args.test, args.tokenizer, args.out,
                       args.text_field, args.tokenizer_sample_mb, args.holdout_every, log=log)
    print(describe(prepared))
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

    p = _parser(sub, "prepare", "tokenize a text corpus into memory-mapped token files (cached)")
    p.add_argument("--data", required=True, help="text files or globs (comma-separated; .txt, "
                   ".jsonl, .parquet, text/jsonl may be .gz/.xz), hf:<dataset>[:<config>], "
                   "hf:<saved dir>, or synthetic")
    p.add_argument("--valid", help="validation files (with --test; else documents are split "
                   "deterministically)")
    p.add_argument("--test", help="test files")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="BPE vocabulary (default 16384; taken from --tokenizer when given)")
    p.add_argument("--tokenizer", help="reuse this tokenizers JSON file instead of training one")
    p.add_argument("--out", help="output directory (default: a directory under GATELAB_CACHE "
                   "or ./cache keyed by the source and tokenizer)")
    p.add_argument("--text-field", default="text", help="jsonl/parquet/hf text field")
    p.add_argument("--tokenizer-sample-mb", type=float, default=None,
                   help="train the BPE on the first this many MB of training text (default 32)")
    p.add_argument("--holdout-every", type=int, default=None,
                   help="without --valid/--test: document i goes to valid when i %% N == 0, "
                   "to test when i %% N == 1 (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_prepare)

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
