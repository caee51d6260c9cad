"""The tags and parameters the lab writes on its runs, each name once, and a run read back as a
record (`CellRecord.from_run`): the one place a grid's resume, the report and the time
estimate turn an MLflow run into the cell it holds.

Tag values are text, and stores hold them for good (users' stores, the committed
docs/store/*.tar.xz): a name or a value's spelling here is a file format. The learning rate
travels as text in the `lr` tag and in a cell's run name (`format_lr`, `%g`) and is read back
by `parse_lr` alone; tests/unit/test_records_cells.py reads the committed snapshots back to the
records the report read from them before this module existed.

No MLflow here: lab/records/owners.py imports this module, and the pool and `gatelab train`
import that one before their one-line errors (benchmarks/README.md, start-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lab.errors import LabError

# --- every run the lab trains (lab/records/runs.py run_tags) ------------------------------
VARIANT_TAG = "variant"
SEED_TAG = "seed"
LR_TAG = "lr"                    # format_lr of train.lr
PRESET_TAG = "preset"
DATA_TAG = "data"                # the corpus: data.source
CONFIG_HASH_TAG = "config_hash"  # RunConfig.hash(): a cell's identity
GIT_COMMIT_TAG = "git_commit"
DIVERGED_TAG = "diverged"        # "true" / "false", set when training ends (lab/training/run.py)
# Why a run has no analysis: "skipped: <why>" or "failed: <error>" (lab/analysis/outputs.py,
# lab/training/run.py).
ANALYSIS_TAG = "analysis"
# What a run trained on: the GPU's name (torch.cuda.get_device_name) or "cpu"; set by the
# process that trains it (a grid's parent never initialises CUDA), read by time estimates.
DEVICE_TAG = "device"
# Why a run ended other than FINISHED (lab/records/runs.py end_run; the grid's workers).
FAILURE_KIND_TAG = "gatelab.failure_kind"   # oom, disk_full, config, error, worker_died
FAILURE_TAG = "gatelab.failure"             # the one-line message
KILLED_REASON_TAG = "gatelab.killed_reason"
# Who trains a run (lab/records/owners.py): host:pid:start of its process, and the unix
# seconds of that process's latest beat, which is how another host tells it is alive.
OWNER_TAG = "gatelab.owner"
HEARTBEAT_TAG = "gatelab.heartbeat"

# --- a grid's runs (lab/experiments/grid/) -------------------------------------------------
GRID_PARENT_TAG = "gatelab.grid_parent"     # "true" on a grid's parent run
GRID_TAG = "gatelab.grid"                   # on a grid's parent and on each of its cells' runs
RUNS_PER_GPU_TAG = "gatelab.runs_per_gpu"   # on a GPU cell's run: cells sharing its GPU then
# The claim a cell trains under (lab/experiments/grid/claims.py): on the parent the parameter
# gatelab.claim/<config_hash>/<attempt> = owner@time, on the cell's run the tag
# <config_hash>/<attempt>; the one name serves both.
CLAIM_PARAM = "gatelab.claim"
CLAIM_TAG = CLAIM_PARAM
RESUMED_TAG = "gatelab.resumed"             # "true" on a cell's run continued from its checkpoint

# --- a sweep's runs (lab/experiments/sweep/) -----------------------------------------------
SWEEP_TAG = "sweep"              # the sweep's name, on its parents and trials
STUDY_TAG = "study"              # <sweep>/<variant>
SWEEP_ROLE_TAG = "sweep_role"    # "parent" on a study's parent run
TRIAL_TAG = "trial"              # the Optuna trial's number
STATE_TAG = "state"              # a trial's run: running | complete | pruned | diverged | failed


def format_lr(lr: float) -> str:
    """A learning rate as its tag and a cell's run name hold it (`3e-3` -> '0.003')."""
    return f"{lr:g}"


def parse_lr(text: str | None) -> float:
    """format_lr's text back to the number; a run without the tag reads as NaN (a run made
    outside a grid may lack it)."""
    if text is None:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise LabError(f"tag {LR_TAG}: {text!r} is not a learning rate") from None


def cell_name(variant: str, lr: float, seed: int) -> str:
    """A run's name in the store: a grid cell's, and the default for a single run."""
    return f"{variant}/lr={format_lr(lr)}/seed={seed}"


@dataclass(frozen=True)
class CellRecord:
    """One run as the cell it holds: its identity (variant, LR, seed, config hash) and state,
    read from its tags and parameters. `run` is the MLflow run it was read from, for what
    needs more of it (its owner, its metrics)."""

    run_id: str
    status: str                  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    variant: str                 # "?" where the run has no variant tag
    lr: float                    # NaN where it has no lr tag
    seed: int                    # -1 where it has no seed tag
    config_hash: str | None
    diverged: bool
    ffn: str                     # the model's FFN (`model.ffn`), "dense" for runs before MoE
    runs_per_gpu: int = 1        # cells that shared its GPU (RUNS_PER_GPU_TAG)
    start_time: int | None = None
    end_time: int | None = None
    run: object = field(default=None, compare=False, repr=False)

    @classmethod
    def from_run(cls, run) -> "CellRecord":
        tags, info = run.data.tags, run.info
        return cls(info.run_id, info.status, tags.get(VARIANT_TAG, "?"),
                   parse_lr(tags.get(LR_TAG)), int(tags.get(SEED_TAG, -1)),
                   tags.get(CONFIG_HASH_TAG), tags.get(DIVERGED_TAG) == "true",
                   run.data.params.get("model.ffn", "dense"),
                   int(tags.get(RUNS_PER_GPU_TAG, "1")), info.start_time, info.end_time, run)

    @property
    def name(self) -> str:
        return cell_name(self.variant, self.lr, self.seed)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"
