"""A grid's run records as the report's rows: one per variant at its best LR (lowest mean
validation perplexity over seeds, diverged runs counting as worse than any) and one per
variant and LR, each with its Δ paired by seed against the baseline, the paper's Δ beside it
(dense Table 2 or the MoE tables: set_paper_reference) and the means of the analysis
metrics; and the sink series runs logged through training."""

from __future__ import annotations

import math

import numpy as np

from lab.model.variants import PAPER_DENSE_BASELINE_PPL, VARIANTS
from lab.reports.seeds import BASELINE, Row, RunRecord, paired_delta, t_interval

# Columns beside the perplexity, where runs carry them (lab/analysis/metrics.py, lab/training/callbacks.py);
# the long-context names are `long/ppl_<k>x[_yarn]` (MLflow rejects '@').
ANALYSIS_PREFIXES = ("gate/mean", "sink/first_token_attn", "sink/head_share",
                     "sink/bos_reliance", "act/max_mean", "attn/logit_max", "long/ppl_",
                     "train/grad_norm_max")


def variant_order(variant: str) -> tuple:
    order = list(VARIANTS)
    return (variant != BASELINE, order.index(variant) if variant in order else len(order), variant)


def row_label(row: Row, rows: list[Row]) -> str:
    """The variant, with the LR when `rows` hold more than one LR (the plots' legends and the
    terminal's short table)."""
    return f"{row.variant} lr={row.lr:g}" if len({r.lr for r in rows}) > 1 else row.variant


def _rank(row: Row) -> tuple:
    # Lower is better; a group with diverged runs or no perplexity ranks after all others.
    return (row.diverged > 0, row.ppl is None, row.ppl.mean if row.ppl else 0.0)


def build_rows(run_records: list[RunRecord]) -> tuple[list[Row], list[Row]]:
    """(one row per variant at its best LR, one row per variant and LR)."""
    groups: dict[tuple[str, float], list[RunRecord]] = {}
    for record in run_records:
        groups.setdefault((record.variant, record.lr), []).append(record)
    dense = is_dense(run_records)
    all_rows = []
    for (variant, lr), runs in groups.items():
        runs.sort(key=lambda r: r.seed)
        row = Row(variant, lr, runs, t_interval([r.val_ppl for r in runs if r.val_ppl is not None]))
        if variant in VARIANTS:
            set_paper_reference(row, VARIANTS[variant], dense=dense)
        all_rows.append(row)
    best: dict[str, Row] = {}
    for row in all_rows:
        if row.variant not in best or _rank(row) < _rank(best[row.variant]):
            best[row.variant] = row
    baseline = best.get(BASELINE)
    for row in all_rows:
        if baseline is not None:
            row.delta = paired_delta(row, baseline)
            row.baseline_ppl = baseline.ppl.mean if baseline.ppl else None
        row.extra = analysis_metrics(row.runs)
    all_rows.sort(key=lambda r: (variant_order(r.variant), r.lr))
    rows = sorted(best.values(), key=lambda r: variant_order(r.variant))
    return rows, all_rows


def is_dense(run_records: list[RunRecord]) -> bool:
    return all(r.ffn != "moe" for r in run_records)


def set_paper_reference(row: Row, variant, dense: bool) -> None:
    """The paper's Δ for the row: the dense Table 2's for a dense preset where that table has
    the variant, else the MoE tables' (1, 3, 4, 6); both kept for the report's last columns.
    (A Table 2 row of the registry, the sandwich norm, is dense whatever the preset.)"""
    own = None if variant.paper_delta_ppl is None else \
        (variant.paper_delta_ppl, variant.paper_baseline_ppl)
    table_2 = variant.paper.startswith("T2")
    row.paper_moe = None if table_2 else own
    row.paper_dense = own if table_2 else None if variant.paper_dense_ppl is None else \
        (variant.paper_dense_delta_ppl, PAPER_DENSE_BASELINE_PPL)
    chosen, row.paper_table = ((row.paper_dense, "dense") if row.paper_dense and
                               (dense or row.paper_moe is None) else (row.paper_moe, "MoE"))
    if chosen is None:
        row.paper_table = ""
    else:
        row.paper_delta, row.paper_baseline_ppl = chosen


def analysis_metrics(runs: list[RunRecord]) -> dict[str, float]:
    """Mean over seeds of every analysis metric a run carries (another module logs them)."""
    names = sorted({k for r in runs for k in r.metrics if k.startswith(ANALYSIS_PREFIXES)})
    out = {}
    for name in names:
        values = [r.metrics[name] for r in runs if name in r.metrics and math.isfinite(r.metrics[name])]
        if values:
            out[name] = float(np.mean(values))
    return out


# The sink measures a run logs through training (`train.analysis_every`; lab/analysis/metrics.py):
# Gu et al.'s share on 64-token windows with and without BOS (trend 7's measure) and F-Attn.
SINK_HISTORY = (("sink/head_share_short", "Gu's Sink^0.3 share, 64-token BOS windows"),
                ("sink/head_share_short_random", "Gu's Sink^0.3 share, 64-token windows, no BOS"),
                ("sink/first_token_attn", "F-Attn, 1,024-token BOS windows"))


def metric_series(client, run_id: str, metric: str) -> list[tuple[int, float]]:
    """The metric through training, one point a step, in step order: where two values share
    a step (the periodic probe and the end-of-run analysis both log the last one), the later
    logged. What the sink table, the ladder plot and the criterion's premise read."""
    history = sorted(client.get_metric_history(run_id, metric),
                     key=lambda m: (m.step, m.timestamp))
    return sorted({m.step: m.value for m in history}.items())


def sink_histories(client, rows: list[Row]) -> dict[str, dict[str, dict[int, dict[float, float]]]]:
    """metric -> variant -> seed -> {tokens trained: value}, for the runs that logged a sink
    measure at more than one step. Tokens per step: the run's `tokens/seen` over its step."""
    out: dict = {}
    for row in rows:
        for run in row.runs:
            seen = max(client.get_metric_history(run.run_id, "tokens/seen"),
                       key=lambda m: m.step, default=None)
            per_step = seen.value / seen.step if seen is not None and seen.step else None
            for name, _ in SINK_HISTORY:
                points = metric_series(client, run.run_id, name)
                if len(points) < 2 or per_step is None:
                    continue
                out.setdefault(name, {}).setdefault(row.variant, {})[run.seed] = {
                    step * per_step: value for step, value in points}
    return out


