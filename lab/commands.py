"""`gatelab`'s commands: each takes the arguments lab/cli.py parsed, calls the module below
that does the command's work, prints its result and returns its exit code.

Each command imports the modules it runs when it runs, and checks its input first where it
can: importing them all at start-up (torch, Lightning, MLflow, Optuna behind them) took
about 8 s on the 2-core CPU machine, against 0.1 s for `gatelab --help` (python -X
importtime -m lab --help): a measured start-up cost (benchmarks/README.md, start-up).
tests/integration/test_cli_terminal.py holds --help, `variants` and the one-line errors to it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

from lab.errors import LabError


def _check_option(args) -> bool | str:
    """--no-check / --check -> the grid's and the sweep's `check` (lab/check.py)."""
    return "force" if args.check else not args.no_check


def cmd_train(args) -> int:
    from lab.config import resolve
    from lab.experiments.files import check_experiment_name
    from lab.model.gates import parse_gate
    from lab.model.variants import custom_variant

    check_experiment_name("--experiment", args.experiment)
    variant = custom_variant(parse_gate(args.gate)) if args.gate else args.variant
    config = resolve(variant, args.preset, args.overrides, data=args.data, tokens=args.tokens,
                     seed=args.seed, lr=args.lr)
    import torch

    from lab.experiments.pool import cpu_threads

    # Threads as a grid's one CPU worker has them: torch's default (every core) made the tiny
    # example 6x slower on a machine other jobs shared (lab/experiments/pool.py).
    threads = cpu_threads(args.cpu_threads, 1, config.model.d_model)
    # (Lightning and MLflow only now: a bad config's error line does not wait for them)
    from lab.training.run import describe, train_run

    torch.set_num_threads(threads)
    try:
        result = train_run(config, args.tracking_uri, experiment=args.experiment,
                           quiet=args.quiet)
    except Exception as err:
        from lab.records import describe_failure

        kind, message = describe_failure(err, config)
        if kind != "disk_full" or isinstance(err, LabError):
            raise
        print(f"error: {message} (the run is FAILED)", file=sys.stderr)  # recorded: exit 1
        return 1
    print(describe(result))
    return 0


def cmd_prepare(args) -> int:
    from lab.data.corpus import describe, prepare

    log = None if args.quiet else (lambda message: print(message, flush=True))
    prepared = prepare(args.data, args.vocab_size, args.valid, args.test, args.tokenizer, args.out,
                       args.text_field, args.tokenizer_sample_mb, args.holdout_every, log=log)
    print(describe(prepared))
    return 0


def cmd_ui(args) -> int:
    from lab.ui import serve

    return serve(args.host, args.port, args.tracking_uri)


def cmd_variants(args) -> int:
    from lab.reports.variants import print_variants

    print_variants(args.preset, as_json=args.json, gate=args.gate, out=args.out)
    return 0


def cmd_grid(args) -> int:
    from lab.experiments.schema import load_grid, with_cli

    spec = with_cli(load_grid(args.file), preset=args.preset, data=args.data, tokens=args.tokens,
                    seeds=args.seeds, lrs=args.lrs, variants=args.variants,
                    overrides=args.overrides)
    if spec.criterion is not None and spec.criterion.trends:
        # (the trends are the report's to name: one it would refuse fails here, before a cell)
        from lab.reports.criterion import check_trends
        check_trends(spec.criterion, f"grid file {args.file}")
    # (MLflow and Lightning only now: a bad grid file's error line does not wait for them)
    from lab.experiments.grid.run import GridOptions, describe_summary, run_grid
    options = GridOptions(gpus=args.gpus, runs_per_gpu=args.runs_per_gpu,
                          cpu_workers=args.cpu_workers,
                          cpu_threads=args.cpu_threads, dry_run=args.dry_run,
                          tracking_uri=args.tracking_uri, shard=args.shard, quiet=args.quiet,
                          stale_after_s=args.stale_after, check=_check_option(args),
                          time_limit_s=args.time_limit, warm_first=args.warm_first,
                          compile_ahead=args.compile_ahead)
    summary = run_grid(spec, options)
    if args.dry_run:
        return 0
    print(describe_summary(summary))
    return 1 if summary.failed else 0


def cmd_report(args) -> int:
    from lab.reports.compose import report_grids

    print(report_grids(args.grid, args.tracking_uri, args.out, args.control,
                       args.equivalence_percent, args.broke_margin))
    return 0


def cmd_demo(args) -> int:
    from lab import records
    from lab.experiments.grid.run import GridOptions, describe_summary, run_grid
    from lab.experiments.schema import load_grid
    from lab.progress import duration
    from lab.reports.grid_report import build_report, terminal_summary

    started = time.time()
    spec = load_grid(Path(__file__).resolve().parents[1] / "ablations" / "smoke.yaml")
    # Two one-thread workers: a tiny model gains nothing from a second intra-op thread.
    workers = args.cpu_workers or min(2, os.cpu_count() or 1)
    summary = run_grid(spec, GridOptions(tracking_uri=args.tracking_uri, quiet=args.quiet,
                                         cpu_workers=workers, cpu_threads=1))
    print(describe_summary(summary))
    if len(summary.failed) == len(summary.outcomes) and not summary.already_done:
        return 1
    report = build_report(spec.name, args.tracking_uri)
    uri = records.tracking_uri(args.tracking_uri)
    experiment = records.client(uri).get_experiment_by_name(spec.name).experiment_id
    print(f"\n{terminal_summary(report)}\n\n"
          f"demo done in {duration(time.time() - started)}. Full report: "
          f"{report.out_dir}/report.md (tables, CSV, plots; also on the grid's parent run).\n"
          "Open the UI: make ui   (or .venv/bin/gatelab ui), then the smoke grid's runs:\n"
          f"  {records.runs_page_url('http://127.0.0.1:5000', experiment)}")
    return 1 if summary.failed else 0


def cmd_bench(args) -> int:
    from lab.bench import run_bench

    out = Path(args.out) if args.out else Path("benchmarks") / (
        f"{datetime.date.today().isoformat()}-{args.preset.replace(',', '_')}-x{args.devices}.json")
    run_bench(args.preset.split(","), args.variants.split(","), steps=args.steps,
              warmup=args.warmup, data=args.data, overrides=args.overrides, devices=args.devices,
              lab_variants=[v for v in args.lab_variants.split(",") if v], out=out,
              uri=args.tracking_uri, profile=args.profile, rounds=args.rounds)
    return 0


def cmd_check(args) -> int:
    from lab.check import describe, run_check

    report = run_check(args.preset, args.variants, args.precision, args.overrides, args.modes,
                       args.layers, args.batch, args.seed, args.tolerance, args.jobs,
                       log=lambda line: print(line, flush=True))
    print(describe(report))
    if report.failures:
        for failure in report.failures:
            print(f"check failed: {failure}", file=sys.stderr)
        return 1
    print("check passed: every variant's fast path is within tolerance of the reference")
    return 0


def cmd_store(args) -> int:
    from lab.records.snapshot import pack, unpack

    if args.action == "pack":
        if len(args.file) > 1:
            raise LabError(f"store pack: one FILE to write, got {len(args.file)}")
        print(pack(args.file[0], plots=args.plots, grid=args.grid,
                   force=args.force).describe("packed"))
    else:
        if args.grid or args.force or args.plots:
            raise LabError("store unpack: --grid, --force and --plots are options of pack")
        print(unpack(args.file).describe("unpacked into"))
    return 0


def cmd_export(args) -> int:
    from lab.export import export

    result = export(args.run, args.out, fmt=args.format, dtype=args.dtype, tokenizer=args.tokenizer,
                    force=args.force)
    print(result.describe())
    return 0


def cmd_analyze(args) -> int:
    from lab.reports.analyze import analyze_target, summary

    run_id, result, files = analyze_target(args.target, args.tracking_uri, args.windows,
                                           args.long_context, args.out)
    print(summary(result))
    where = f"run {run_id}" if run_id else "no MLflow run"
    print(f"logged to {where}; files: {', '.join(files) if files else 'none'}")
    return 0


def cmd_sweep(args) -> int:
    from lab.experiments.sweep.run import run_sweep
    from lab.experiments.sweep.spec import load_sweep
    from lab.reports.sweep_report import format_summary

    sweep = load_sweep(args.sweep_file).with_flags(preset=args.preset, data=args.data,
                                                   tokens=args.tokens, overrides=args.overrides)
    if args.variants:
        sweep = sweep.with_variants([v.strip() for v in args.variants.split(",") if v.strip()])
    summaries = run_sweep(sweep, n_trials=args.n_trials, workers=args.workers,
                          storage=args.storage, tracking_uri=args.tracking_uri, quiet=args.quiet,
                          check=_check_option(args))
    print(format_summary(summaries))
    return 0


def cmd_sweep_report(args) -> int:
    from lab.reports.sweep_report import format_summary, sweep_report

    summaries, plot = sweep_report(args.sweep, args.storage, args.out, args.tracking_uri,
                                   args.tolerance)
    print(format_summary(summaries))
    print(f"plot: {plot}")
    return 0
