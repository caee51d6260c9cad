"""`gatelab`: argument parsing and dispatch only; each command's body is in lab/commands.py,
which calls the modules below that do its work.

Every bad input a user can fix raises LabError, which ends here as one line on stderr
and exit code 2, before any MLflow run is created. SIGINT and SIGTERM end `train`, `grid`,
`sweep` and `demo` with 130 and 143, their runs KILLED (lab/interrupts.py).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

from lab import commands
from lab.errors import LabError

EXAMPLES = {
    "train": "gatelab train --variant sdpa_elementwise_sigmoid_mul --preset tiny --data synthetic "
             "--tokens 2e5 --set train.lr=3e-3",
    "prepare": "gatelab prepare --data 'gutenberg-en/train-*.txt.xz' --valid gutenberg-en/valid.txt.xz "
               "--test gutenberg-en/test.txt.xz --vocab-size 16384",
    "ui": "gatelab ui --port 5000",
    "variants": "gatelab variants --preset small --json",
    "demo": "gatelab demo",
    "grid": "gatelab grid ablations/smoke.yaml --seeds 0,1 --dry-run",
    "report": "gatelab report smoke --out reports/smoke",
    "bench": "gatelab bench --preset base,medium --variants baseline,sdpa_elementwise_sigmoid_mul "
             "--lab-variants baseline --steps 30",
    "export": "gatelab export 3f2a9c0d1e4b4f6e8a7b5c4d3e2f1a0b --format hf --out exports/gated-tiny",
    "analyze": "gatelab analyze 3f2c9a... --windows 16 --long-context 1,2,4",
    "sweep": "gatelab sweep sweeps/lr.yaml --variants baseline --n-trials 4 --workers 2",
    "sweep-report": "gatelab sweep-report lr --out reports/sweeps/lr",
    "check": "gatelab check --preset small --variants all",
    "store": "gatelab store pack reproduction-out/reproduce.tar.xz --grid reproduce",
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the lab's one `error:` line and exit code 2, not its usage
    block (`--tokens abc`: "error: --tokens: invalid float value: 'abc' (see gatelab train
    --help)"); the subcommands' parsers are of this class too."""

    def error(self, message: str):
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


CPU_THREADS_HELP = ("torch threads of each {unit} (default: the cores{share}, one for the "
                    "CPU presets tiny and moe-tiny, which a second thread does not speed up)")


def _parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text,
                          epilog=f"example:\n  {EXAMPLES[name]}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                        "else sqlite:///mlruns/mlflow.db)")


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """--quiet and --verbose, the same on every command (lab/progress.py)."""
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--quiet", action="store_true",
                        help="results only, no progress lines (CI, scripts)")
    levels.add_argument("--verbose", action="store_true",
                        help="also the libraries' own messages (Lightning, MLflow, Optuna) and "
                        "a progress line at every tenth of each run")


def _add_no_check(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-check", action="store_true",
                       help="on a GPU, skip `gatelab check` of the variants before the first run")
    which.add_argument("--check", action="store_true",
                       help="on a GPU, check every variant even where it passed before on this "
                       "code and device (lab/check.py keeps passes in the cache's checks/)")


def _add_overrides(parser: argparse.ArgumentParser, scope: str = "") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (model.*, train.*, data.* or gate.*)"
                        + (f" {scope}" if scope else "") + "; repeatable")


def _add_file_options(parser: argparse.ArgumentParser, unit: str) -> None:
    """`gatelab grid` and `gatelab sweep` alike: flags that replace their file's values
    (lab/experiments/schema.py, ExperimentSpec.with_flags)."""
    parser.add_argument("--preset", help="replace the file's preset")
    parser.add_argument("--data", help="replace the file's data source")
    parser.add_argument("--tokens", help="replace the file's token budget, e.g. 2e5")
    _add_overrides(parser, f"for every {unit}")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset: tiny (CPU), small, base, "
                        "medium, large, xl, deep-narrow, moe-* (default tiny; sizes: "
                        "`gatelab variants --preset NAME`)")
    parser.add_argument("--data", default=None,
                        help="synthetic, a prepared corpus directory (`gatelab prepare`), or "
                        "text files/globs (comma-separated)")
    parser.add_argument("--tokens", type=float, default=None, help="training token budget, e.g. 2e5")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the initial weights and the data order (default 0)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    _add_overrides(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gatelab", description="Gated-attention ablation lab "
                                     "(Qiu et al., 2025): train, sweep and compare gate variants.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _parser(sub, "train", "train one model and record it in MLflow")
    p.add_argument("--variant", default="baseline", help="a variant slug (`gatelab variants`)")
    p.add_argument("--gate", help="a gate by axes instead of a slug, e.g. "
                   "position=sdpa,granularity=headwise,form=additive,activation=silu")
    p.add_argument("--experiment", default="gatelab", help="MLflow experiment name")
    p.add_argument("--cpu-threads", type=int, help=CPU_THREADS_HELP.format(unit="run",
                                                                          share=""))
    _add_run_options(p)
    _add_tracking(p)
    p.set_defaults(func=commands.cmd_train)

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
    p.set_defaults(func=commands.cmd_prepare)

    p = _parser(sub, "ui", "serve the MLflow UI on the local store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=5000, help="port, 1-65535 (default 5000)")
    p.add_argument("--tracking-uri")
    p.set_defaults(func=commands.cmd_ui)

    p = _parser(sub, "variants", "list every variant with its axes and added parameters")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--gate", help="describe one point of the gate space by axes")
    p.add_argument("--out", metavar="FILE", help="also write the full table (with each "
                   "variant's parameter budget and gate axes) to FILE")
    p.set_defaults(func=commands.cmd_variants)

    p = _parser(sub, "analyze", "recompute the attention-sink, massive-activation, gate and "
                "long-context metrics from a run's checkpoint and log them with per-layer plots")
    p.add_argument("target", help="an MLflow run id (uses mlruns/checkpoints/<run id>/last.ckpt) "
                   "or a checkpoint file")
    p.add_argument("--windows", type=int, default=None,
                   help="validation windows to probe (default: the run's train.analysis_windows)")
    p.add_argument("--long-context", default=None, metavar="FACTORS",
                   help="context multiples for long-context perplexity, e.g. 1,2,4,8; '' skips "
                        "(default: the run's train.long_context_factors)")
    p.add_argument("--out", default=None, help="also write analysis.json and the plots here "
                   "(default for a checkpoint without a run: analysis-<checkpoint name>)")
    p.add_argument("--tracking-uri")
    p.set_defaults(func=commands.cmd_analyze)
    p = _parser(sub, "sweep", "learning-rate sweep per variant with Optuna (docs/sweeps.md)")
    p.add_argument("sweep_file", help="a sweep file, e.g. sweeps/lr.yaml")
    _add_file_options(p, "trial")
    p.add_argument("--variants", help="comma-separated subset of the file's variants")
    p.add_argument("--n-trials", type=int, help="trials per variant (default: the file's `trials`); "
                   "a resumed sweep runs only the missing ones")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default "
                   "1), each pinned to one visible GPU, spread evenly over them")
    p.add_argument("--storage", help="Optuna storage: a journal file path (default "
                   "sweeps/<name>.journal) or postgresql://user@host/db for several machines")
    _add_no_check(p)
    _add_tracking(p)
    p.set_defaults(func=commands.cmd_sweep)

    p = _parser(sub, "sweep-report", "best and max-stable LR per variant, and the loss-vs-LR plot")
    p.add_argument("sweep", help="the sweep's name (the `name` in its file)")
    p.add_argument("--storage", help="Optuna storage (default: as `gatelab sweep`)")
    p.add_argument("--out", help="output directory (default reports/sweeps/<sweep>/)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="max stable LR: within this fraction of the best loss (default 0.02)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of the sweep's runs")
    p.set_defaults(func=commands.cmd_sweep_report)

    p = _parser(sub, "grid", "run an ablation grid (variants x LRs x seeds), resumable, into MLflow")
    p.add_argument("file", help="grid file, e.g. ablations/core.yaml")
    _add_file_options(p, "cell")
    p.add_argument("--seeds", help="replace the file's seeds, e.g. 0,1,2")
    p.add_argument("--lrs", help="replace the file's learning rates, e.g. 1e-3,3e-3")
    p.add_argument("--variants", help="replace the file's variants: slugs, comma-separated, or all")
    p.add_argument("--gpus", help="all (default) or CUDA indices, e.g. 0,1: one worker per GPU")
    p.add_argument("--runs-per-gpu", default="auto",
                   help="cells trained at once on each GPU, or auto (default): from the measured "
                   "packing gain of the preset (small models leave a large GPU mostly idle)")
    p.add_argument("--cpu-workers", type=int, default=1,
                   help="cells trained at once without GPUs (default 1)")
    p.add_argument("--cpu-threads", type=int, help=CPU_THREADS_HELP.format(unit="CPU worker",
                                                                          share=" / workers"))
    p.add_argument("--shard", help="run only shard i of n (i/n), for grids spread over machines")
    p.add_argument("--stale-after", type=float, default=600.0,
                   help="seconds without a heartbeat after which another host's run counts as "
                   "dead (default 600)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="start no cell after this many seconds from the grid's start that would "
                   "not end before them, judged by the longest cell run so far (before one has ended: the "
                   "store's measured rate for the preset, packing included, except for DDP "
                   "cells; a time-limited "
                   "job slot: cells in progress finish instead of being killed; rerun to go on)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cells, parameter counts and a time estimate; run nothing")
    p.add_argument("--warm-first", action="store_true",
                   help="with several workers, start one cell of each compiled shape first and "
                   "the others of that shape once it has compiled (they load its graphs from "
                   "the cache instead of compiling them side by side)")
    p.add_argument("--no-compile-ahead", dest="compile_ahead", action="store_false",
                   help="do not compile the later cells' shapes in a process of their own while "
                   "the first cells train (by default it does where the preset's measured "
                   "memory leaves room for it: docs/grid.md)")
    _add_no_check(p)
    _add_tracking(p)
    p.set_defaults(func=commands.cmd_grid)

    p = _parser(sub, "report", "compare the variants of a grid: tables (Markdown, CSV) and plots")
    p.add_argument("grid", nargs="+", help="grid name (the MLflow experiment), or its grid "
                   "file (ablations/NAME.yaml), whose `criterion:` the report then checks "
                   "(by name: the one the grid last ran with); with several "
                   "(e.g. the two scales), each grid's report and then the trend verdicts "
                   "side by side, with the grids where each holds")
    p.add_argument("--out", help="output folder (default reports/<grid>; one grid only)")
    p.add_argument("--equivalence-percent", type=float, default=None,
                   help="the band within which the trend verdicts call two variants the "
                   "same, in percent of the right side's mean (default 1: lab/reports/trends/verdicts.py)")
    p.add_argument("--broke-margin", type=float, default=None, metavar="NATS",
                   help="over an LR ladder, a run broke when it diverged or ended this many "
                   "nats above its variant's best rung (default: the grid file's "
                   "criterion's broke_margin, else 0.1: lab/reports/trends/measures.py "
                   "BROKE_MARGIN)")
    p.add_argument("--control", metavar="GRID", help="a grid that changes one setting of "
                   "this one (e.g. reproduce-base-init): each variant's Δ PPL against the "
                   "control's same variant, else its baseline (two factors changed), paired "
                   "by seed (report.md, control.csv)")
    p.add_argument("--tracking-uri")
    p.set_defaults(func=commands.cmd_report)

    p = _parser(sub, "demo", "the smoke grid on the synthetic corpus and its report, on CPU in "
                "a few minutes")
    p.add_argument("--cpu-workers", type=int, help="cells trained at once (default: 2, or 1 "
                   "on a one-core machine)")
    _add_tracking(p)
    p.set_defaults(func=commands.cmd_demo)

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
    _add_overrides(p, "for every benchmarked model")
    p.add_argument("--out", help="JSON output (default benchmarks/<date>-<presets>-x<devices>.json)")
    p.add_argument("--tracking-uri", help="store for the lab-path runs (default: mlruns/bench.db)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time a preset's variants together in this many interleaved rounds "
                        "(median reported); 1 = one model at a time")
    p.add_argument("--profile", action="store_true",
                   help="also profile the bare loop: <out>-profile-<preset>-<variant>.txt, top kernels")
    p.set_defaults(func=commands.cmd_bench)

    p = _parser(sub, "check", "compare each variant's fast path (precision, eager and compiled, "
                "the SDPA backend PyTorch picks) with a float32 explicit-softmax reference")
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--variants", default="all", help="all, or comma-separated variant slugs")
    p.add_argument("--precision", help="bf16-mixed, 16-mixed or 32-true (default: what a run "
                   "trains in here: bf16-mixed on GPU, 32-true on CPU)")
    p.add_argument("--modes", help="eager, compiled or eager,compiled (default: eager, and "
                   "compiled where a run compiles: on GPU)")
    p.add_argument("--layers", type=int, default=2, help="layers of the checked model (default "
                   "2; 0 = the preset's depth): every layer runs the same code and shapes")
    p.add_argument("--batch", type=int, default=2, help="sequences in the checked batch (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--jobs", type=int, help="variants checked side by side, one process each "
                   "(default: 4 on a GPU, 1 on the CPU)")
    p.add_argument("--tolerance", type=float, help="one relative-error tolerance for logits, "
                   "loss and gradients (default: per precision, lab/check.py TOLERANCES)")
    _add_overrides(p)
    p.set_defaults(func=commands.cmd_check)

    p = _parser(sub, "store", "pack the local MLflow store (mlruns/, or GATELAB_STORE), or one "
                "grid's experiment of it, into one file, or unpack one or several such files "
                "into an empty store, to move runs between machines and checkouts (artifact "
                "locations re-rooted; checkpoints stay behind)")
    p.add_argument("action", choices=("pack", "unpack"))
    p.add_argument("file", nargs="+", help="pack: the snapshot to write (FILE.tar.xz); unpack: "
                   "the snapshots to read (several merge into one store; older .tgz ones unpack "
                   "too), e.g. docs/store/*.tar.xz")
    p.add_argument("--grid", metavar="NAME", help="pack: only this grid's experiment (the "
                   "lab commits one snapshot per grid, docs/store/<grid>.tar.xz)")
    p.add_argument("--force", action="store_true", help="pack: replace FILE if it exists")
    p.add_argument("--plots", action="store_true",
                   help="pack: keep the runs' PNG plots too (default: data only; the reports "
                   "draw their own)")
    p.set_defaults(func=commands.cmd_store)

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
    p.set_defaults(func=commands.cmd_export)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in action.choices.values():
        _add_verbosity(command)
    return parser


# Commands that train: a stop signal ends their runs KILLED and them with 128 + its number.
STOPPABLE = {"train": "its run is KILLED",
             "grid": "runs in progress are KILLED; rerun the same command to resume",
             "sweep": "trials in progress are KILLED; rerun the same command to resume",
             "demo": "runs in progress are KILLED; rerun it to resume"}


def main(argv: list[str] | None = None) -> int:
    # The first thing, before any heavy import: a stop signal from here on ends the command
    # in one line (lab/interrupts.py stop_from_the_start; lab.interrupts itself is light).
    from lab.interrupts import interruption, runs_killed, stop_from_the_start, stop_on_signals

    words = sys.argv[1:] if argv is None else argv
    command = words[0] if words and not words[0].startswith("-") else None  # (parse may be cut)
    with stop_from_the_start():
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            # After parsing, so that --help and a usage error import neither (Lightning and
            # SQLAlchemy behind them: seconds; the start-up cost above).
            from lab.progress import set_verbosity

            set_verbosity("quiet" if args.quiet else "verbose" if args.verbose else "normal")
            with stop_on_signals() if args.command in STOPPABLE else nullcontext():
                return args.func(args)
        except LabError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            stop = interruption(err)
            what = (f"; {STOPPABLE[command]}" if runs_killed() else "; no run was in progress") \
                if command in STOPPABLE else ""
            print(f"gatelab{' ' + command if command else ''}: stopped by {stop.name}{what}",
                  file=sys.stderr)
            return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
