"""Issue 20: the bad-input fuzz suite. Every case is a command a user could type; each must
end with exit code 2, exactly one stderr line starting with `error:`, no traceback, and no
MLflow run in a fresh store. Resolve-time checks need no training, so the cases run
in-process through `lab.cli.main` (one case also as a real process, to show it is the same).

A case is (id, argv, expected text in the message); `{tmp}` in argv is the test's folder,
`{grid}` / `{sweep}` a valid grid / sweep file there, and `{corpus:<kind>}` a prepared
corpus made broken in the way `kind` names (see `_corpus`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


TRAIN = ["train", "--quiet", "--preset", "tiny", "--data", "synthetic", "--tokens", "4096"]
GRID_FILE = "name: fuzz\npreset: tiny\ntokens: 4096\nvariants: [baseline]\n"
SWEEP_FILE = ("name: fuzz\npreset: tiny\ntokens: 4096\nvariants: [baseline]\n"
              "lr: {low: 1.0e-3, high: 1.0e-2}\ntrials: 2\n")
GATED = "sdpa_elementwise_sigmoid_mul"


def train(*args: str) -> list[str]:
    return [*TRAIN, *args]


def sets(*pairs: str) -> list[str]:
    return train(*[part for pair in pairs for part in ("--set", pair)])


def grid(*args: str) -> list[str]:
    return ["grid", "{grid}", "--quiet", *args]


def grid_file(text: str) -> list[str]:
    return ["grid", "{tmp}/written.yaml", "--quiet", f"@write:{text}"]


def sweep(*args: str) -> list[str]:
    return ["sweep", "{sweep}", "--quiet", *args]


def sweep_file(text: str) -> list[str]:
    return ["sweep", "{tmp}/written.yaml", "--quiet", f"@write:{text}"]


CASES = [
    # --- train: flags ---------------------------------------------------------------------
    ("tokens-1e30", train("--tokens", "1e30"), "train.tokens: 1e+30 tokens x"),
    ("tokens-inf", train("--tokens", "inf"), "train.tokens: expected a finite number, got inf"),
    ("tokens-nan", train("--tokens", "nan"), "train.tokens: expected a finite number, got nan"),
    ("tokens-zero", train("--tokens", "0"), "train.tokens: must be a positive number, got 0"),
    ("tokens-negative", train("--tokens", "-5"), "train.tokens: must be a positive number"),
    ("tokens-below-one-step", train("--tokens", "100"),
     "train.tokens: 100 is less than one optimizer step of 16 sequences x 128 tokens = 2,048"),
    ("lr-inf", train("--lr", "inf"), "train.lr: expected a finite number, got inf"),
    ("lr-nan", train("--lr", "nan"), "train.lr: expected a finite number, got nan"),
    ("lr-zero", train("--lr", "0"), "train.lr: must be a positive number, got 0"),
    ("lr-negative", train("--lr=-1e-3"), "train.lr: must be a positive number"),
    ("seed-too-large", train("--seed", "99999999999"),
     "train.seed: must be an integer in [0, 4294967295]"),
    ("seed-negative", train("--seed", "-1"), "train.seed: must be a non-negative integer"),
    # issue 40: argparse's type errors are one line too, not its usage block
    ("tokens-not-a-number", train("--tokens", "abc"),
     "error: --tokens: invalid float value: 'abc' (see gatelab train --help)"),
    ("seed-not-a-number", train("--seed", "x"), "--seed: invalid int value: 'x'"),
    ("lr-not-a-number", train("--lr", "fast"), "--lr: invalid float value: 'fast'"),
    ("grid-cpu-workers-text", grid("--cpu-workers", "two"), "--cpu-workers: invalid int value"),
    ("sweep-workers-text", sweep("--workers", "2.5"), "--workers: invalid int value: '2.5'"),
    ("prepare-vocab-text", ["prepare", "--data", "{tmp}/doc.txt", "--vocab-size", "big"],
     "--vocab-size: invalid int value: 'big'"),
    ("command-missing", [], "the following arguments are required: command"),
    ("experiment-empty", train("--experiment", ""), "--experiment: expected an MLflow experiment"),
    ("experiment-blank", train("--experiment", "  "), "--experiment: expected an MLflow experiment"),
    # issue 40: names MLflow and the file system take, checked before anything
    ("experiment-newline", train("--experiment", "two\nlines"),
     "--experiment: 'two\\nlines' holds the control character '\\n'"),
    ("experiment-tab", train("--experiment", "a\tb"), "holds the control character '\\t'"),
    ("experiment-300-chars", train("--experiment", "e" * 300),
     "--experiment: at most 255 bytes (it names the experiment's artifact folder), got 300"),
    ("experiment-600-chars", train("--experiment", "e" * 600), "at most 255 bytes"),
    ("experiment-multibyte", train("--experiment", "\u00e9" * 200), "at most 255 bytes, got 400"
     .replace("bytes, got", "bytes (it names the experiment's artifact folder), got")),
    ("grid-name-300-chars", grid_file(GRID_FILE.replace("name: fuzz", "name: " + "g" * 300)),
     "name: at most 128 characters"),
    ("grid-name-129-chars", grid_file(GRID_FILE.replace("name: fuzz", "name: " + "g" * 129)),
     "name: at most 128 characters (it names the MLflow experiment, runs, files and folders), "
     "got 129"),
    ("grid-name-600-chars", grid_file(GRID_FILE.replace("name: fuzz", "name: " + "g" * 600)),
     "name: at most 128 characters"),
    ("sweep-name-300-chars", sweep_file(SWEEP_FILE.replace("name: fuzz", "name: " + "s" * 300)),
     "name: at most 128 characters"),
    ("grid-name-newline", grid_file(GRID_FILE.replace("name: fuzz", 'name: "a\\nb"')),
     "must be letters, digits"),
    ("preset-unknown", train("--preset", "huge"), "preset: unknown preset 'huge'"),
    ("variant-unknown", train("--variant", "baselin"), "unknown variant 'baselin'"),
    ("gate-axis-unknown", train("--gate", "position=nowhere"), "position"),
    ("set-without-equals", train("--set", "train.lr"), "--set: expected key=value"),
    ("set-unknown-section", sets("optim.lr=1"), "keys look like section.field"),
    ("set-unknown-field", sets("train.nope=1"), "unknown field 'nope' of train"),
    # --- train: model.* -------------------------------------------------------------------
    ("vocab-2", sets("model.vocab_size=2"), "model.vocab_size: must be an integer in [16, 16777216]"),
    ("vocab-0", sets("model.vocab_size=0"), "model.vocab_size: must be a positive integer, got 0"),
    ("vocab-huge", sets("model.vocab_size=99999999999"), "model.vocab_size: must be an integer in"),
    ("vocab-text", sets("model.vocab_size=abc"), "model.vocab_size: expected a int, got 'abc'"),
    ("rms-eps-negative", sets("model.rms_eps=-1"), "model.rms_eps: must be a positive number"),
    ("rms-eps-zero", sets("model.rms_eps=0"), "model.rms_eps: must be a positive number, got 0.0"),
    ("rms-eps-nan", sets("model.rms_eps=nan"), "model.rms_eps: expected a finite number, got nan"),
    ("layers-zero", sets("model.n_layers=0"), "model.n_layers: must be a positive integer"),
    ("d-model-fraction", sets("model.d_model=2.5"), "model.d_model: expected a int, got '2.5'"),
    ("kv-heads-indivisible", sets("model.n_kv_heads=3"), "model.n_heads: 4 query heads are not"),
    ("head-dim-odd", sets("model.head_dim=15"), "model.head_dim: RoPE needs an even head_dim"),
    ("context-zero", sets("model.context=0"), "model.context: must be a positive integer"),
    ("rope-base-negative", sets("model.rope_base=-1"), "model.rope_base: must be a positive number"),
    ("rope-base-inf", sets("model.rope_base=inf"), "model.rope_base: expected a finite number"),
    ("init-std-zero", sets("model.init_std=0"), "model.init_std: must be a positive number"),
    ("residual-clip-negative", sets("model.residual_clip=-1"), "model.residual_clip: must be a"),
    ("residual-clip-text", sets("model.residual_clip=big"),
     "model.residual_clip: expected a finite number or none, got 'big'"),
    ("sdpa-transform", sets("model.sdpa_transform=foo"), "model.sdpa_transform: 'foo' is not one"),
    ("ffn-kind", sets("model.ffn=sparse"), "model.ffn: 'sparse' is not one of dense, moe"),
    ("qk-norm-not-bool", sets("model.qk_norm=maybe"), "model.qk_norm: expected true or false"),
    ("switch-head-malformed", sets("model.switch_head=kv:x"), "model.switch_head: expected 'kv:E:K'"),
    ("gate-insert-no-gate", sets("model.gate_insert_fraction=0.5"), "needs a gate to insert"),
    ("gate-insert-above-one", train("--variant", GATED, "--set", "model.gate_insert_fraction=1.5"),
     "model.gate_insert_fraction: must lie in (0, 1)"),
    ("gate-activation", train("--variant", GATED, "--set", "gate.activation=tanh"),
     "gate.activation: 'tanh' is not one of"),
    ("gate-bias-not-bool", train("--variant", GATED, "--set", "gate.bias=2"),
     "gate.bias: expected true or false"),
    ("gate-on-baseline", sets("gate.activation=silu"), "variant baseline has no gate to change"),
    # --- train: train.* -------------------------------------------------------------------
    ("weight-decay-negative", sets("train.weight_decay=-1"),
     "train.weight_decay: must be a non-negative number, got -1.0"),
    ("grad-clip-negative", sets("train.grad_clip=-1"), "train.grad_clip: must be a positive number"),
    ("grad-clip-zero", sets("train.grad_clip=0"), "train.grad_clip: must be a positive number"),
    ("spike-window-zero", sets("train.spike_window=0"), "train.spike_window: must be a positive int"),
    ("checkpoint-every-negative", sets("train.checkpoint_every=-1"),
     "train.checkpoint_every: must be a non-negative integer, got -1"),
    ("beta1-two", sets("train.beta1=2"), "train.beta1: must lie in [0, 1), got 2.0"),
    ("beta1-one", sets("train.beta1=1"), "train.beta1: must lie in [0, 1), got 1.0"),
    ("beta2-negative", sets("train.beta2=-0.1"), "train.beta2: must lie in [0, 1), got -0.1"),
    ("eps-negative", sets("train.eps=-1"), "train.eps: must be a positive number, got -1.0"),
    ("eps-zero", sets("train.eps=0"), "train.eps: must be a positive number, got 0.0"),
    ("devices-absent", [*sets("train.devices=1024", "train.batch_size=1024"), "--tokens", "2e5"],
     "train.devices: 1024 devices per run, but"),
    ("devices-zero", sets("train.devices=0"), "train.devices: must be a positive integer, got 0"),
    ("batch-zero", sets("train.batch_size=0"), "train.batch_size: must be a positive integer"),
    ("micro-batch-indivisible", sets("train.batch_size=3", "train.micro_batch_size=2"),
     "train.micro_batch_size: batch_size 3 must be a multiple"),
    ("micro-batch-negative", sets("train.micro_batch_size=-1"), "train.micro_batch_size:"),
    ("min-lr-ratio", sets("train.min_lr_ratio=2"), "train.min_lr_ratio: must lie in [0, 1]"),
    ("warmup-one", sets("train.warmup_fraction=1"), "train.warmup_fraction: must lie in [0, 1)"),
    ("val-every-zero", sets("train.val_every=0"), "train.val_every: must be a positive integer"),
    ("log-every-negative", sets("train.log_every=-3"), "train.log_every: must be a positive int"),
    ("patience-zero", sets("train.divergence_patience=0"), "train.divergence_patience: must be"),
    ("ceiling-inf", sets("train.divergence_loss_ceiling=inf"),
     "train.divergence_loss_ceiling: expected a finite number"),
    ("spike-k-negative", sets("train.spike_k=-1"), "train.spike_k: must be a non-negative"),
    ("spike-floor-negative", sets("train.spike_floor=-1"), "train.spike_floor: must be a non-neg"),
    ("spike-merge-negative", sets("train.spike_merge=-1"), "train.spike_merge: must be a non-neg"),
    ("precision", sets("train.precision=fp8"), "train.precision: 'fp8' is not one of"),
    ("compile-mode", sets("train.compile_mode=fast"), "train.compile_mode: 'fast' is not one of"),
    ("fused-loss-unknown", sets("train.fused_loss=flash"), "train.fused_loss: 'flash' is not one of"),
    # (no GPU here: "needs a CUDA GPU"; a GPU without liger-kernel: "is not importable here")
    ("fused-loss-here", sets("train.fused_loss=liger"), "train.fused_loss=liger: "),
    ("grid-fused-loss-here", grid("--set", "train.fused_loss=liger"), "train.fused_loss=liger: "),
    ("analysis-windows-negative", sets("train.analysis_windows=-1"), "train.analysis_windows:"),
    ("context-factors", sets("train.long_context_factors=1,x"), "train.long_context_factors:"),
    ("sink-threshold", sets("train.sink_head_threshold=1.5"), "train.sink_head_threshold: must lie"),
    ("sink-short-window", sets("train.sink_short_window=1"), "train.sink_short_window: must be an"),
    ("seed-inf-by-set", sets("train.seed=inf"), "train.seed: expected a int, got 'inf'"),
    ("seed-fraction-by-set", sets("train.seed=1.5"), "train.seed: expected a int, got '1.5'"),
    ("deterministic-not-bool", sets("train.deterministic=sometimes"), "train.deterministic:"),
    # --- train: data ----------------------------------------------------------------------
    ("data-vocab-1", sets("data.vocab_size=1"), "data.vocab_size: must be an integer in [16,"),
    ("data-empty", train("--data", ""), "data.source: expected synthetic"),
    ("data-bos-not-bool", sets("data.bos_aligned=maybe"), "data.bos_aligned: expected true or"),
    ("data-missing-file", train("--data", "{tmp}/nope.txt"), "file not found"),
    ("corpus-ids-past-vocab", train("--data", "{corpus:ids-past-vocab}"),
     "holds token id 600, outside its vocabulary of 512"),
    ("corpus-manifest-vocab-shrunk", train("--data", "{corpus:old-manifest-shrunk}"),
     "outside its vocabulary of 100"),
    ("corpus-manifest-not-json", train("--data", "{corpus:not-json}"), "corrupt manifest"),
    ("corpus-manifest-no-dtype", train("--data", "{corpus:no-dtype}"),
     "corrupt manifest"),
    ("corpus-truncated", train("--data", "{corpus:truncated}"), "is missing or truncated"),
    # issue 40: a manifest that misdescribes its token files is refused at open
    ("corpus-dtype-float16", train("--data", "{corpus:dtype-float16}"),
     "dtype 'float16' does not describe these tokens: a vocabulary of 512 is stored as uint16"),
    ("corpus-dtype-uint32", train("--data", "{corpus:dtype-uint32}"),
     "dtype 'uint32' does not describe these tokens"),
    ("corpus-dtype-int8", train("--data", "{corpus:dtype-int8}"), "dtype 'int8' does not describe"),
    ("corpus-dtype-not-text", train("--data", "{corpus:dtype-number}"), "dtype 7 does not describe"),
    ("corpus-max-id-understated", train("--data", "{corpus:max-id-understated}"),
     "max_token_id 300, but the largest id in the token files is 499"),
    ("corpus-count-inflated", train("--data", "{corpus:count-inflated}"),
     "train.bin is missing or truncated (expected 21000 tokens x 2 bytes = 42000 bytes, "
     "found 40000 bytes)"),
    ("corpus-count-negative", train("--data", "{corpus:count-negative}"),
     "splits.valid: expected an integer >= 0, got -5"),
    ("corpus-split-missing", train("--data", "{corpus:split-missing}"),
     "splits: expected the token counts of train, valid, test"),
    ("corpus-vocab-2-40", train("--data", "{corpus:vocab-2-40}"),
     "vocab_size: expected an integer [1, 4294967296], got 1099511627776"),
    ("corpus-vocab-fraction", train("--data", "{corpus:vocab-fraction}"),
     "vocab_size: expected an integer [1, 4294967296], got 512.5"),
    ("corpus-vocab-beyond-model", train("--data", "{corpus:vocab-beyond-model}"),
     "data: the corpus's vocab_size (the model's vocabulary): must be an integer in [16, 16777216]"),
    ("corpus-eos-negative", train("--data", "{corpus:eos-negative}"),
     "eos_id: expected an integer [0, 511], got -1"),
    ("corpus-eos-past-vocab", train("--data", "{corpus:eos-past-vocab}"),
     "eos_id: expected an integer [0, 511], got 512"),
    ("corpus-manifest-a-list", train("--data", "{corpus:manifest-a-list}"),
     "expected a JSON object, got list"),
    # --- grid: flags and files ------------------------------------------------------------
    ("grid-binary-file", ["grid", "{tmp}/binary.yaml", "--quiet", "@binary"],
     "not UTF-8 text (byte 0x89 at offset 0)"),
    ("grid-missing-file", ["grid", "{tmp}/absent.yaml", "--quiet"], "not found"),
    ("grid-stale-after-negative", grid("--stale-after", "-1"),
     "--stale-after: must be a positive number, got -1.0"),
    ("grid-stale-after-nan", grid("--stale-after", "nan"), "--stale-after: must be a positive"),
    ("grid-tokens-inf", grid("--tokens", "inf"), "--tokens: must be a positive number, got 'inf'"),
    ("grid-tokens-1e30", grid("--tokens", "1e30"), "train.tokens: 1e+30 tokens x"),
    ("grid-seed-too-large", grid("--seeds", "99999999999"), "train.seed: must be an integer in"),
    ("grid-lrs-nan", grid("--lrs", "nan"), "--lrs: must be a positive number"),
    ("grid-runs-per-gpu-zero", grid("--runs-per-gpu", "0"), "--runs-per-gpu: must be at least 1"),
    ("grid-cpu-threads-zero", grid("--cpu-threads", "0"), "--cpu-threads: must be at least 1"),
    ("grid-set-beta", grid("--set", "train.beta1=2"), "train.beta1: must lie in [0, 1)"),
    ("grid-file-tokens-1e30", grid_file(GRID_FILE.replace("4096", "1e30")), "train.tokens: 1e+30"),
    ("grid-file-bool-for-int", grid_file(GRID_FILE + "overrides: {model.n_layers: true}\n"),
     "model.n_layers: expected an integer, got True"),
    ("grid-file-float-for-int", grid_file(GRID_FILE + "overrides: {train.batch_size: 2.5}\n"),
     "train.batch_size: expected an integer, got 2.5"),
    ("grid-file-int-for-bool", grid_file(GRID_FILE + "overrides: {model.qk_norm: 3}\n"),
     "model.qk_norm: expected true or false, got 3"),
    ("grid-file-inf-eps", grid_file(GRID_FILE + "overrides: {model.rms_eps: .inf}\n"),
     "model.rms_eps: expected a finite number, got inf"),
    ("grid-file-weight-decay", grid_file(GRID_FILE + "overrides: {train.weight_decay: -1}\n"),
     "train.weight_decay: must be a non-negative number, got -1"),
    ("grid-file-criterion-trend", grid_file(
        GRID_FILE + "criterion: {written: before, premise: [{variant: baseline, measure: "
        "sink/first_token_attn, at_least: 0.03}], trends: [99]}\n"),
     "criterion: trends: '99' is not a trend"),
    ("grid-file-criterion-no-written", grid_file(GRID_FILE + "criterion: {broke_margin: 0.05}\n"),
     "criterion: written: say when"),
    ("report-grid-file-missing", ["report", "{tmp}/absent.yaml"],
     "absent.yaml not found"),
    # (a later grid file's bad trend stops the command before the first grid's report)
    ("report-grid-file-criterion-trend", [
        "report", "{grid}", "{tmp}/written.yaml",
        "@write:" + GRID_FILE + "criterion: {written: before, trends: [99]}\n"],
     "written.yaml: criterion: trends: '99' is not a trend"),
    # --- issue 40: the store and output places, checked before a run is made --------------
    ("tracking-uri-memory", train("--tracking-uri", "sqlite:///:memory:"),
     "--tracking-uri: 'sqlite:///:memory:' is an in-memory SQLite database"),
    ("tracking-uri-memory-bare", train("--tracking-uri", "sqlite://"), "is an in-memory SQLite"),
    ("grid-tracking-uri-memory", grid("--tracking-uri", "sqlite:///:memory:"),
     "is an in-memory SQLite database"),
    ("sweep-tracking-uri-memory", sweep("--tracking-uri", "sqlite:///:memory:"),
     "is an in-memory SQLite database"),
    ("export-out-a-file", ["export", "{tmp}/none.ckpt", "--out", "{grid}"],
     "--out: {grid} is a file, not a folder"),
    ("export-out-under-a-file", ["export", "{tmp}/none.ckpt", "--out", "{grid}/model"],
     "--out: {grid} is a file, not a folder (in the path {grid}/model)"),
    ("prepare-out-under-a-file", ["prepare", "--data", "{tmp}/doc.txt", "--out", "{sweep}/corpus"],
     "is a file, not a folder"),
    # --- sweep: flags and files -----------------------------------------------------------
    ("sweep-storage-directory", sweep("--storage", "{tmp}"), "is a directory"),
    ("sweep-storage-under-a-file", sweep("--storage", "{sweep}/x.journal"),
     "--storage: cannot write the journal file"),
    ("sweep-n-trials-zero", sweep("--n-trials", "0"), "--n-trials: must be a positive integer"),
    ("sweep-workers-zero", sweep("--workers", "0"), "--workers: must be a positive integer"),
    ("sweep-variants-unknown", sweep("--variants", "nosuch"), "--variants: nosuch not in sweep"),
    ("sweep-binary-file", ["sweep", "{tmp}/binary.yaml", "--quiet", "@binary"], "not UTF-8 text"),
    ("sweep-preset-list", sweep_file(SWEEP_FILE.replace("preset: tiny", "preset: [tiny]")),
     "preset: expected a preset name, got ['tiny']"),
    ("sweep-lr-inverted", sweep_file(SWEEP_FILE.replace("low: 1.0e-3, high: 1.0e-2",
                                                        "low: 1.0e-2, high: 1.0e-3")),
     "lr: low (0.01) must be below high (0.001)"),
    ("sweep-lr-zero", sweep_file(SWEEP_FILE.replace("low: 1.0e-3", "low: 0")),
     "lr.low: must be a positive number"),
    ("sweep-tokens-inf", sweep_file(SWEEP_FILE.replace("4096", ".inf")),
     "tokens: must be a positive number"),
    ("sweep-trials-zero", sweep_file(SWEEP_FILE.replace("trials: 2", "trials: 0")),
     "trials: must be a positive integer"),
    # issue 40: no number of a file is NaN or infinite, wherever it is
    ("sweep-pruner-nan", sweep_file(SWEEP_FILE + "pruner: {kind: median, n_warmup_steps: .nan}\n"),
     "pruner.n_warmup_steps: expected a finite number, got nan"),
    ("sweep-pruner-inf", sweep_file(SWEEP_FILE + "pruner: {kind: median, n_startup_trials: .inf}\n"),
     "pruner.n_startup_trials: expected a finite number, got inf"),
    ("sweep-pruner-negative", sweep_file(SWEEP_FILE + "pruner: {kind: median, n_warmup_steps: -3}\n"),
     "pruner: options {'n_warmup_steps': -3} refused by Optuna's median pruner"),
    ("sweep-pruner-text", sweep_file(SWEEP_FILE + "pruner: {kind: successive_halving, "
                                                  "min_resource: lots}\n"),
     "refused by Optuna's successive_halving pruner"),
    ("sweep-description-nan", sweep_file(SWEEP_FILE + "description: .nan\n"),
     "description: expected a finite number, got nan"),
    ("grid-lrs-nan-in-file", grid_file(GRID_FILE + "lrs: [1.0e-3, .nan]\n"), "lrs"),
    ("grid-extends-chain", ["grid", "{tmp}/chain-0.yaml", "--quiet", "@chain:80"],
     "extends: a chain of more than 64 files"),
    ("sweep-override-eps", sweep_file(SWEEP_FILE + "overrides: {train.eps: -1}\n"),
     "train.eps: must be a positive number"),
    ("sweep-preset-flag", sweep("--preset", "huge"), "preset: unknown preset 'huge'"),
    ("sweep-tokens-flag-inf", sweep("--tokens", "inf"), "--tokens: must be a positive number"),
    ("sweep-set-lr", sweep("--set", "train.lr=1e-3"),
     "--set.train.lr: set this with the sweep's `lr` field"),
    ("sweep-file-unknown-key", sweep_file(SWEEP_FILE + "colour: red\n"),
     "written.yaml: unknown field 'colour'; allowed: name, preset"),
    ("sweep-report-tolerance", ["sweep-report", "fuzz", "--tolerance", "2"],
     "--tolerance: must lie in [0, 1)"),
]


def _corpus(tmp: Path, kind: str) -> Path:
    """A small prepared corpus under tmp, broken as `kind` says."""
    from lab.data.store import MANIFEST, write_store

    path = tmp / f"corpus-{kind}"
    tokens = np.arange(20_000) % 500
    if kind == "ids-past-vocab":  # what a tokenizer larger than the manifest says gives
        tokens = tokens.copy()
        tokens[123] = 600
    write_store(path, {s: tokens for s in ("train", "valid", "test")},
                vocab_size=2 ** 25 if kind == "vocab-beyond-model" else 512,
                eos_id=0, source="fuzz", tokenizer_hash="fuzz")
    manifest = json.loads((path / MANIFEST).read_text())
    lies = {"dtype-float16": ("dtype", "float16"), "dtype-uint32": ("dtype", "uint32"),
            "dtype-int8": ("dtype", "int8"), "dtype-number": ("dtype", 7),
            "max-id-understated": ("max_token_id", 300), "vocab-2-40": ("vocab_size", 2 ** 40),
            "vocab-fraction": ("vocab_size", 512.5), "eos-negative": ("eos_id", -1),
            "eos-past-vocab": ("eos_id", 512)}
    if kind in lies:
        manifest[lies[kind][0]] = lies[kind][1]
    elif kind == "count-inflated":
        manifest["splits"]["train"] += 1000
    elif kind == "count-negative":
        manifest["splits"]["valid"] = -5
    elif kind == "split-missing":
        del manifest["splits"]["test"]
    elif kind == "manifest-a-list":
        manifest = [manifest]
    if kind == "old-manifest-shrunk":  # written before max_token_id, then edited by hand
        del manifest["max_token_id"]
        manifest["vocab_size"] = 100
    elif kind == "no-dtype":
        del manifest["dtype"]
    elif kind == "truncated":
        (path / "valid.bin").write_bytes(b"\0" * 10)
    if kind == "not-json":
        (path / MANIFEST).write_bytes(b"\x89PNG not json")
    else:
        (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def _argv(template: list[str], tmp: Path) -> list[str]:
    (tmp / "grid.yaml").write_text(GRID_FILE)
    (tmp / "sweep.yaml").write_text(SWEEP_FILE)
    (tmp / "doc.txt").write_text("A document to prepare.<|endoftext|>Another one.\n" * 50)
    argv = []
    for part in template:
        if part.startswith("@write:"):
            (tmp / "written.yaml").write_text(part[len("@write:"):])
        elif part.startswith("@chain:"):  # chain-0 extends chain-1 ... extends the grid
            length = int(part[len("@chain:"):])
            for n in range(length):
                target = f"chain-{n + 1}.yaml" if n + 1 < length else "grid.yaml"
                (tmp / f"chain-{n}.yaml").write_text(f"name: chain{n}\nextends: {target}\n")
        elif part == "@binary":
            (tmp / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
        elif part.startswith("{corpus:"):
            argv.append(str(_corpus(tmp, part[len("{corpus:"):-1])))
        else:
            argv.append(part.format(tmp=tmp, grid=tmp / "grid.yaml", sweep=tmp / "sweep.yaml"))
    return argv


def _run_count(uri: str) -> int:
    with sqlite3.connect(uri[len("sqlite:///"):]) as db:
        runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        experiments = db.execute("SELECT COUNT(*) FROM experiments").fetchone()[0]
    return runs + experiments - 1  # the Default experiment is always there


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit argparse ends a usage error with."""
    from lab.cli import main

    try:
        return main(argv)
    except SystemExit as done:
        return done.code


def test_the_suite_is_the_size_the_issue_asks_for():
    assert len(CASES) >= 60
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("template, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_no_run(store, tmp_path, capsys, template,
                                                       expected):
    assert _exit_code(_argv(template, tmp_path)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    expected = expected.replace("{grid}", str(tmp_path / "grid.yaml"))
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert _run_count(store) == 0


@pytest.mark.slow
def test_a_real_process_refuses_the_same_way(store, tmp_path):
    """The in-process cases stand for the command: one, run as `python -m lab`."""
    done = subprocess.run([sys.executable, "-m", "lab", *train("--tokens", "inf")],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["error: train.tokens: expected a finite number, got inf"]
    assert _run_count(store) == 0


def test_a_corpus_written_in_range_opens_and_records_its_largest_id(tmp_path):
    from lab.data.store import TokenStore, write_store

    tokens = np.arange(5000) % 300
    written = write_store(tmp_path / "ok", {s: tokens for s in ("train", "valid", "test")},
                          vocab_size=512, eos_id=0, source="fuzz", tokenizer_hash="fuzz")
    assert written.manifest["max_token_id"] == 299
    assert TokenStore.open(tmp_path / "ok").max_token_id() == 299


# --- issue 40: a read-only store and a full disk, before a run is made -------------------------

ENVIRONMENT_COMMANDS = {"train": train(), "grid": grid(), "sweep": sweep(),
                        "export": ["export", "{tmp}/none.ckpt", "--out", "{tmp}/exported"],
                        "prepare": ["prepare", "--data", "{tmp}/doc.txt", "--out",
                                    "{tmp}/corpus", "--quiet"]}


def _one_error_line(capsys, expected: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], \
        captured.err
    assert "Traceback" not in captured.err + captured.out and not captured.out, captured.out
    return lines[0]


@pytest.mark.parametrize("command", sorted(ENVIRONMENT_COMMANDS))
def test_a_read_only_place_is_one_line_before_any_run(store, tmp_path, capsys, monkeypatch,
                                                      command):
    """Every folder the command would write in refuses a file, as a read-only file system
    does (even to root, whom permission bits do not stop): one line, exit 2, no run."""
    import errno
    import tempfile

    from lab.cli import main

    argv = _argv(ENVIRONMENT_COMMANDS[command], tmp_path)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert main(argv) == 2
    _one_error_line(capsys, "(Read-only file system)")
    assert _run_count(store) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a folder without write permission")
def test_a_store_folder_without_write_permission_is_one_line(store, tmp_path, capsys):
    from lab.cli import main

    argv = _argv(train(), tmp_path)
    folder = Path(store[len("sqlite:///"):]).parent
    folder.chmod(0o555)
    try:
        assert main(argv) == 2
    finally:
        folder.chmod(0o755)
    _one_error_line(capsys, "store: cannot write in")
    assert _run_count(store) == 0


@pytest.mark.parametrize("command", ["train", "grid", "sweep"])
def test_a_full_disk_under_the_store_is_one_line_before_any_run(store, tmp_path, capsys,
                                                               monkeypatch, command):
    import shutil

    from lab.cli import main

    argv = _argv(ENVIRONMENT_COMMANDS[command], tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
        10 * 2 ** 30, 10 * 2 ** 30 - 2 ** 20, 2 ** 20))
    assert main(argv) == 2
    _one_error_line(capsys, "store: 1 MiB free at ")
    assert _run_count(store) == 0


def test_a_disk_that_fills_while_prepare_writes_is_one_line_and_keeps_nothing(tmp_path, capsys,
                                                                           monkeypatch):
    import errno

    from lab.cli import main
    from lab.data import corpus

    argv = _argv(ENVIRONMENT_COMMANDS["prepare"], tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpus, "write_store", full)
    assert main(argv) == 2
    _one_error_line(capsys, "--out: cannot write the corpus to ")
    assert not (tmp_path / "corpus").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".corpus")] == []


def test_a_disk_that_fills_while_train_runs_is_one_line_and_the_run_failed(store, tmp_path,
                                                                           capsys, monkeypatch):
    """Past the check (the disk filled after the run began): the run ends FAILED with the
    reason, and the command says so in one line, exit 1 (something was recorded)."""
    import errno

    import lightning as L
    from mlflow.tracking import MlflowClient

    from lab.cli import main

    def full_disk(self, filepath, weights_only=None, storage_options=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full_disk)
    argv = _argv(train("--experiment", "full", "--set", "model.context=32", "--set",
                       "train.batch_size=8", "--set", "train.checkpoint_every=2"), tmp_path)
    assert main(argv) == 1
    line = _one_error_line(capsys, "error: disk full writing ")
    assert line.endswith("(the run is FAILED)")
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["gatelab.failure_kind"] == "disk_full"


# --- issue 40: prepare says nothing before its error --------------------------------------------

@pytest.mark.parametrize("name, content, expected", [
    ("broken.txt.xz", b"\xfd7zXZ\x00 not really xz", "data: cannot read "),
    ("latin1.txt", "caf\u00e9 ".encode("latin-1") * 100, "UnicodeDecodeError"),
    ("records.jsonl", b'{"body": "a document"}\n' * 20, "no text field 'text' (found: body)"),
])
def test_prepare_refuses_an_unreadable_source_before_its_first_progress_line(tmp_path, capsys,
                                                                             name, content,
                                                                             expected):
    from lab.cli import main

    (tmp_path / name).write_bytes(content)
    assert main(["prepare", "--data", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, expected)  # and nothing on stdout: no progress line
    assert not (tmp_path / "out").exists()
