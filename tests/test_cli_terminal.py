"""lab/cli.py in a terminal: --help with an example for every command, --quiet, progress bars."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lab.cli import EXAMPLES, build_parser, main

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--preset", "tiny", "--data", "synthetic", "--tokens", str(3 * 4 * 128),
            "--set", "train.batch_size=4", "--set", "train.val_batches=1"]


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


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    """One temporary MLflow store and data cache for this module's runs."""
    root = tmp_path_factory.mktemp("cli")
    return {"GATELAB_STORE": str(root / "mlruns"), "GATELAB_CACHE": str(root / "cache")}


def test_quiet_train_prints_only_its_result(store):
    """A fresh process, as a script or CI job runs it: --quiet must hold from the first import."""
    env = dict(os.environ, **store)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "lab", "train", *TINY_RUN, "--quiet"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no banners, tips, schema messages or progress bars
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run ") and "val/ppl" in lines[0]


def test_train_shows_lightning_progress_bar(store, monkeypatch, capsys):
    for name, value in store.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out
    assert "Epoch 0: 100%" in out and "3/3" in out  # Lightning's tqdm bar
