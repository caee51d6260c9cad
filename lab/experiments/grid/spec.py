"""A grid's cells: the grid file's variants x learning rates x seeds, each resolved through
`lab.config.resolve` and its data opened before anything is written to MLflow (so a typo
costs nothing), and the share of them one shard (`--shard i/n`) runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from lab import records
from lab.config import RunConfig, resolve, with_vocab
from lab.errors import LabError
from lab.experiments.schema import GridSpec
from lab.model.variants import VARIANTS
from lab.training.corpus import open_data


# --- cells ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    variant: str
    lr: float
    seed: int
    config: RunConfig          # resolved, with the data's vocabulary

    @classmethod
    def of(cls, config: RunConfig) -> "Cell":
        """The cell a resolved config (with its data's vocabulary) is."""
        return cls(config.variant, config.train.lr, config.train.seed, config)

    @property
    def name(self) -> str:
        return records.cell_name(self.variant, self.lr, self.seed)

    @property
    def config_hash(self) -> str:
        return self.config.hash()


def _variants(spec: GridSpec) -> list[str]:
    """`all`: every registered variant that resolves at the grid's preset (MoE-only variants
    drop out of a dense preset); an explicit list must resolve entirely."""
    if spec.variants != "all":
        return list(spec.variants)
    available = []
    for slug in VARIANTS:
        try:
            resolve(slug, spec.preset, spec.overrides, data=spec.data, tokens=spec.tokens)
            available.append(slug)
        except LabError:
            continue
    return available


def _learning_rates(spec: GridSpec, variants: list[str]) -> dict[str, tuple[float, ...] | None]:
    if spec.lr_sweep is None:
        return {v: spec.lrs for v in variants}
    # Imported here: reading a sweep's results brings Optuna (0.45 s to import, measured with
    # -X importtime), which only a grid that takes its learning rates from a sweep needs.
    from lab.experiments.sweep.results import best_lrs

    best = best_lrs(spec.lr_sweep)
    missing = [v for v in variants if v not in best]
    if missing:
        raise LabError(f"lrs.from_sweep: sweep {spec.lr_sweep!r} has no best LR for "
                       f"{', '.join(missing)}; run the sweep for them or list lrs")
    return {v: (float(best[v]),) for v in variants}


def plan(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid, resolved and validated, with its data opened (a missing or
    corrupt corpus fails here, before any run). Seeds outermost, so a grid stopped half-way
    already holds whole comparisons at its first seeds; a pool of workers departs from it
    to train a variant's cells of one compiled shape on one worker in turn (docs/grid.md,
    lab/experiments/pool.py `model_of`)."""
    variants = _variants(spec)
    if not variants:
        raise LabError(f"variants: none is available at preset {spec.preset!r}")
    lrs = _learning_rates(spec, variants)
    configs = []
    for seed in spec.seeds:
        for variant in variants:
            for lr in lrs[variant] or (None,):
                config = resolve(variant, spec.preset, spec.overrides, data=spec.data,
                                 tokens=spec.tokens, seed=seed, lr=lr)
                configs.append(config)
    opened: dict = {}
    cells = []
    for config in configs:
        key = dataclasses.astuple(config.data)
        if key not in opened:
            opened[key] = open_data(config)[0].vocab_size
        cells.append(Cell.of(with_vocab(config, opened[key])))
    return cells


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise LabError(f"--shard: expected i/n with 0 <= i < n, e.g. 0/2, got {text!r}")
    return int(match[1]), int(match[2])


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Cell k belongs to shard k mod n: every machine gets a mix of variants and seeds."""
    if shard is None:
        return cells
    index, count = shard
    return [cell for k, cell in enumerate(cells) if k % count == index]
