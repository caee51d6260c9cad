"""The identity of a grid cell: which fields of a resolved RunConfig make its hash.

A grid resumes by this hash: a cell whose hash the store already holds FINISHED is done
(lab/experiments/grid/claims.py, reconcile), so the hash must change exactly when what is trained changes.
The analysis fields (ANALYSIS_FIELDS) only change what is measured afterwards, and the speed
fields (SPEED_FIELDS) only how fast it trains: both are left out. Every field added to
ModelConfig, GateSpec, TrainConfig or DataConfig after stores hold runs goes into
LATER_FIELDS with its default: at that default it is left out, so the
cells recorded before it existed keep their hash and resume instead of rerunning
(tests/unit/test_config.py holds recorded hashes). Add every new field here; where its default
changed what some models train, `_default_changed_training` keeps it in their identity.
"""

from __future__ import annotations

import hashlib
import json

ANALYSIS_FIELDS = ("analysis_windows", "analysis_every", "long_context_factors",
                   "sink_head_threshold", "sink_short_window")
# Fields that change how fast a cell trains, not what it trains, left out at every value.
# compile_mode (since 2026-12-06; before, a non-default mode was in the identity): CUDA graphs
# replay the kernels the default mode runs, so a preset may switch its mode (deep-narrow did,
# to reduce-overhead) and its recorded cells still resume. A cell recorded with a
# non-default mode before gets a new hash and trains once more (the committed store has none).
SPEED_FIELDS = ("compile_mode",)
# Fields added after stores already held runs: left out of a cell's identity while at their
# default, so that a grid recorded before they existed still resumes instead of rerunning.
LATER_FIELDS = {("model", "residual_init_scale"): 1.0,
                ("train", "checkpoint_min_interval_s"): 300.0,
                ("model", "switch_head_added_fraction"): None,
                ("model", "ffn_widen_g1_fraction"): 0.0, ("train", "gate_constant_decay"): False,
                ("train", "fused_loss"): "none"}


def _default_changed_training(raw: dict, section: str, name: str) -> bool:
    """A later field whose default changed what some models train: it stays in their identity
    even at its default, so their cells recorded before are not taken as done. Before
    `gate_constant_decay` the input-independent gate's b was decayed (issue 24)."""
    gate = raw["model"].get("gate")
    return ((section, name) == ("train", "gate_constant_decay") and gate is not None
            and not gate["input_dependent"])


def cell_hash(raw: dict) -> str:
    """The hash of a RunConfig's `to_dict()`: every field that changes what is trained."""
    raw = {section: dict(values) if isinstance(values, dict) else values
           for section, values in raw.items()}
    for name in ANALYSIS_FIELDS + SPEED_FIELDS:
        raw["train"].pop(name, None)
    for (section, name), default in LATER_FIELDS.items():
        if raw[section].get(name) == default and \
                not _default_changed_training(raw, section, name):
            raw[section].pop(name)
    # Compiling changes speed, not what is trained; "auto" (the default since it replaced
    # false) hashes as false did, so grids recorded before it resume instead of rerunning.
    if raw["train"].get("compile") == "auto":
        raw["train"]["compile"] = False
    blob = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
