"""lab/cli.py in a terminal: --help with an example for every command, --quiet and --verbose,
the lab's progress lines, `gatelab ui`'s checks of its port."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lab.cli import EXAMPLES, build_parser, main

REPO = Path(__file__).resolve().parents[2]
TINY_RUN = ["--preset", "tiny", "--data", "synthetic", "--tokens", str(3 * 4 * 128),
            "--set", "train.batch_size=4", "--set", "train.val_batches=1"]


HEAVY = ("torch", "lightning", "mlflow", "optuna", "sqlalchemy", "scipy", "matplotlib")


def imported_by(argv: list[str], env: dict | None = None) -> tuple[list[str], str]:
    """The heavy libraries `python -m lab ARGV` imported, and its stderr: run as the CLI
    runs, in a fresh interpreter, sys.modules read at its exit."""
    probe = ("import runpy, sys\nsys.argv = ['lab'] + sys.argv[1:]\ntry:\n"
             "    runpy.run_module('lab', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, **(env or {})})
    return eval(done.stdout.strip().splitlines()[-1]), done.stderr  # noqa: S307 (our print)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["train", "--bogus"], ["store", "--help"]])
def test_help_and_a_usage_error_import_no_heavy_library(argv):
    """`gatelab --help` stays fast (lab/commands.py imports each command's modules when it runs):
    neither it nor a usage error loads torch, Lightning, MLflow or Optuna."""
    assert imported_by(argv)[0] == []


@pytest.mark.slow
def test_variants_and_one_line_errors_wait_for_no_library_they_do_not_use(store):
    """Start-up (benchmarks/README.md): `variants` counts parameters from the configs' shapes
    and loads none of them; a report of a grid the store lacks, and the store's, train's and
    a grid file's one-line errors, say so before those load."""
    assert imported_by(["variants"])[0] == []
    # `store`: an empty store, which holds no grid `core`
    for argv, message, allowed in (
            (["report", "core"], "error: report: no grid named 'core'", {"sqlalchemy"}),
            (["store", "pack", "x.tgz"], "error: store pack: x.tgz: a snapshot is xz", set()),
            (["store", "unpack", "absent.tar.xz"], "error: store unpack: absent.tar.xz", set()),
            (["train", "--preset", "nope"], "error: preset: unknown preset 'nope'",
             {"sqlalchemy"}),
            (["train", "--set", "train.lr=abc"], "error: train.lr: expected a float",
             {"sqlalchemy"}),
            (["train", "--cpu-threads", "0"], "error: --cpu-threads: must be at least 1",
             {"torch", "sqlalchemy"}),
            (["grid", "absent.yaml"], "error: grid file: absent.yaml not found",
             {"torch", "sqlalchemy"})):
        modules, err = imported_by(argv)
        assert err.startswith(message), (argv, err)
        assert set(modules) <= allowed, (argv, modules)


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_has_help_with_a_parsable_example(name, capsys):
    assert name in EXAMPLES, f"add an example for `gatelab {name}` to EXAMPLES in lab/cli.py"
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([name, "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert f"example:\n  {EXAMPLES[name]}" in help_text
    words = shlex.split(EXAMPLES[name])
    assert words[:2] == ["gatelab", name]
    build_parser().parse_args(words[1:])  # the example is a valid command line


@pytest.mark.slow
def test_quiet_train_prints_only_its_result(new_store):
    """A fresh process, as a script or CI job runs it: --quiet must hold from the first import,
    through the store's creation."""
    done = run_cli(["train", *TINY_RUN, "--quiet"], new_store("cli", migrated=False).env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no banners, tips, schema messages or progress bars
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run ") and "val/ppl" in lines[0]


# What Lightning, torch and MLflow print on their own (issue: the demo log was full of it).
LIBRARY_NOISE = ("GPU available", "TPU available", "Tip:", "litlogger", "LeafSpec", "weights_only",
                 "num_workers", "does not have many workers", "Epoch 0", "v_num",
                 "Creating initial MLflow database tables", "it/s]")


def run_cli(args: list[str], env: dict | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m lab ARGS` in a fresh process, on the store the `store` fixture set in
    os.environ or the one `env` names."""
    env = dict(os.environ, **(env or {}))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("GATELAB_VERBOSITY", None)
    return subprocess.run([sys.executable, "-m", "lab", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_prints_the_labs_lines_and_none_of_the_libraries(store):
    """Normal level, a fresh process: the parameter line and the result, nothing else."""
    done = run_cli(["train", *TINY_RUN])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert not [noise for noise in LIBRARY_NOISE if noise in done.stdout]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("[baseline] parameters: ") and lines[-1].startswith("run ")


@pytest.mark.slow
def test_verbose_train_prints_a_progress_line_per_tenth_and_the_libraries(store):
    done = run_cli(["train", *TINY_RUN, "--verbose"])
    assert done.returncode == 0, done.stderr
    steps = [line.strip() for line in done.stdout.splitlines() if " step " in line]
    # 3 steps: a line at each (a tenth of 3 rounds up to one step), in the one lab format.
    assert [line.split("  ")[0] for line in steps] == [f"[baseline] step {i}/3" for i in (1, 2, 3)]
    assert all(re.search(r"  loss \d+\.\d{4}  [\d,]+ tokens/s  ETA \d+s$", line) for line in steps)
    assert "GPU available" in done.stdout + done.stderr  # Lightning's own messages are back


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_command_takes_quiet_and_verbose_but_not_both(command, capsys):
    parser = commands()[command]
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--quiet", "--verbose"} <= flags
    required = [a for a in parser._actions if a.required or (not a.option_strings
                                                             and a.nargs is None)]
    words = [next(iter(a.choices)) if a.choices else "x" for a in required]  # positionals
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, *words, "--quiet", "--verbose"])
    assert done.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["-1", "0", "99999", "65536"])
def test_ui_refuses_a_port_out_of_range_in_one_line(port, capsys):
    assert main(["ui", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --port: must be between 1 and 65535, got {port}\n"


def test_ui_refuses_a_port_in_use_before_starting_a_server(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --port: 127.0.0.1:{port} is not free")


def test_run_options_have_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED seed of the initial weights and the data order" in text
    assert "--preset PRESET model preset: tiny (CPU)" in text


@pytest.mark.slow
def test_sweep_workers_print_one_line_per_trial_and_nothing_else(store, tmp_path):
    """Two worker processes on one terminal: whole lines, one per finished trial, no bars,
    no Optuna or Lightning log; the journal path shown as a path."""
    import yaml

    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(yaml.safe_dump(dict(
        name="two", preset="tiny", data="synthetic", tokens=2.5e4, variants=["baseline"],
        lr={"ladder": [3e-3, 3e-2]}, pruner="none", overrides={"train.val_every": 4})))
    done = run_cli(["sweep", str(sweep_file), "--workers", "2", "--storage",
                    str(tmp_path / "two.journal")])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"[two/baseline] 2 trial(s) to run; storage {tmp_path}/two.journal;")
    trials = [line for line in lines if line.startswith("  [two/baseline] trial ")]
    assert len(trials) == 2 and {t.split()[2] for t in trials} == {"0", "1"}
    assert all(re.fullmatch(r"  \[two/baseline\] trial [01]  lr=0\.0\d+  seed=0: val loss "
                            r"\d+\.\d{4}, 0 spike\(s\) in \d+s", t) for t in trials), trials
    assert not [noise for noise in LIBRARY_NOISE + ("Trial 0", "A new study") if noise in done.stdout]


def readme_commands() -> list[list[str]]:
    """Each command line of README.md's bash blocks, as words, comments dropped."""
    text = (REPO / "README.md").read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_commands_parse_and_need_only_the_clone_or_say_whose_data():
    """Every `gatelab` line parses; the files it names are in the repository, made by an
    earlier line, or marked as the reader's own (path/to/...); every `make` target exists."""
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    made: set[str] = set()
    commands = readme_commands()
    assert len(commands) >= 10
    for words in commands:
        if words[0] == "make":
            assert words[1] in targets, words
            continue
        if "=" in words[0]:  # a shell variable for the lines below
            assert "path/to/" in words[0], words
            continue
        assert words[0] == "gatelab", words
        args = build_parser().parse_args(words[1:])
        for name in ("file", "sweep_file"):
            if getattr(args, name, None):
                assert (REPO / getattr(args, name)).is_file(), words
        data = getattr(args, "data", None)
        if data and data != "synthetic":
            assert "path/to/" in data or "$" in data or data in made, words
        if words[1] == "prepare" and args.out:
            made.add(args.out)


@pytest.mark.parametrize("flags, cores, threads", [
    (["--preset", "tiny"], 8, 1),               # a CPU preset: one thread, as a grid worker
    (["--preset", "small"], 8, 8),              # a wider model: every core, as one grid worker
    (["--preset", "tiny", "--cpu-threads", "3"], 8, 3),
])
def test_train_sets_its_threads_as_a_grid_worker_does(flags, cores, threads, monkeypatch):
    """`gatelab train` trains on the thread count lab.experiments.pool.cpu_threads gives a
    grid's single CPU worker, not torch's default (every core, 6x slower for `tiny` on a
    machine other jobs share)."""
    import torch

    from lab.training import run

    seen = []

    def record(config, *args, **kwargs):
        seen.append(torch.get_num_threads())
        raise SystemExit(0)  # the run itself is not what is tested

    monkeypatch.setattr(run, "train_run", record)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(SystemExit):
            main(["train", *flags, "--data", "synthetic", "--quiet"])
    finally:
        torch.set_num_threads(before)
    assert seen == [threads]


def test_train_refuses_zero_threads_before_anything_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    assert main(["train", "--preset", "tiny", "--cpu-threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --cpu-threads: must be at least 1, got 0"
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("argv", [["variants", "--preset", "small"],
                                  ["variants", "--preset", "moe-small"],
                                  ["grid", str(REPO / "ablations/paper.yaml"), "--dry-run"]])
def test_tables_fit_120_columns_and_say_where_the_full_one_is(argv, store, tmp_path, capsys):
    """`gatelab variants` printed 215 columns (two both headed "paper") and a dry run 217:
    the terminal gets 120 at most; the full variants table goes to --out FILE. (`store`:
    the dry run prepares the grid's corpus, in the tests' shared cache, not the checkout's.)"""
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 20 and max(len(line) for line in lines) <= 120
    if argv[0] == "variants":
        assert lines[0].split()[:4] == ["slug", "in", "paper", "paper"]  # in paper, paper dPPL
        assert "--out FILE" in lines[-1]
        assert main([*argv, "--out", str(tmp_path / "variants.txt")]) == 0
        full = (tmp_path / "variants.txt").read_text()
        assert "budget: ours (paper)" in full and "sdpa (G1) elementwise" in full
        assert str(tmp_path / "variants.txt") in capsys.readouterr().out
