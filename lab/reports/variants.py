"""`gatelab variants`: the registry as a table or JSON, with parameters added at a preset.

Each row: the slug, its gate axes (or the architecture changes of a control), the
parameters it adds over the baseline at the chosen preset (counted from the config's
shapes, lab/model/params.py: no model is built, so even `xl` costs nothing), the paper's table and row, and the paper's delta-PPL
where it reports one. A variant that cannot be built at the preset (the MoE-only
`baseline_add4experts` at a dense preset) is listed as unavailable with the reason.

Two kinds of row also carry a `budget`, their added parameters set beside the paper's on a
scale both share (absolute counts are 1000x apart): a Switch Head variant as a multiple of
the projections its experts replace (K+V or V), a parameter-matched baseline as a multiple
of what the G1 elementwise and headwise gates add; `ratio_to_paper` is ours over the paper's
(1.0: the paper's budget at our size). docs/paper-notes.md states the rules; the arithmetic
is the registry's (lab/model/variants.py), this module only lays the rows out.
"""

from __future__ import annotations

import json
from pathlib import Path

from lab.config import resolve
from lab.errors import LabError, check_choice
from lab.model.gates import PAPER_POSITION_NAMES, parse_gate
from lab.model.params import count_params
from lab.model.variants import G1_REFERENCES, VARIANTS, Variant, budget, custom_variant
from lab.presets import PRESETS
from lab.progress import clip


def describe_variant(variant: Variant, preset: str, g1_added: dict[str, int] | None = None) -> dict:
    """One row; `g1_added` (G1 references' added parameters at the preset) for matched
    baselines' budgets."""
    row = {"slug": variant.slug, "axes": variant.gate.axes() if variant.gate else None,
           "model_changes": variant.model, "q_heads_factor": variant.q_heads_factor,
           "kv_heads_factor": variant.kv_heads_factor, "paper": variant.paper,
           "paper_table": variant.paper_table, "paper_row": variant.paper_row,
           "paper_ppl": variant.paper_ppl, "paper_delta_ppl": variant.paper_delta_ppl,
           "paper_gate_mean": variant.paper_gate_mean,
           "paper_first_token_attn": variant.paper_first_token_attn,
           "paper_max_activation": variant.paper_max_activation,
           "description": variant.description, "needs": variant.needs, "preset": preset,
           "paper_added_m": variant.paper_added_m, "budget_of": variant.budget_of,
           "available": True, "unavailable_reason": None,
           "params_total": None, "params_added": None, "budget": None}
    try:
        config = resolve(variant, preset)
    except LabError as err:  # e.g. the MoE-only variant at a dense preset
        row["available"], row["unavailable_reason"] = False, str(err)
        return row
    counts = count_params(config)
    row["params_total"], row["params_added"] = counts["total"], counts["added"]
    row["budget"] = budget(variant, config.model, counts["added"], g1_added)
    return row


def describe_variants(preset: str, gate: str | None = None) -> list[dict]:
    check_choice("preset", preset, tuple(PRESETS))
    if gate:
        return [describe_variant(custom_variant(parse_gate(gate)), preset)]
    g1_added = {name: count_params(resolve(slug, preset))["added"]
                for name, slug in G1_REFERENCES.items()}
    return [describe_variant(variant, preset, g1_added) for variant in VARIANTS.values()]


def _what(row: dict) -> str:
    axes, changes = row["axes"], dict(row["model_changes"])
    for name in ("q_heads_factor", "kv_heads_factor"):
        if row[name] != 1.0:
            changes[name.replace("_factor", "")] = f"x{row[name]:g}"
    parts = []
    if axes:
        parts.append(f"{axes['position']} ({PAPER_POSITION_NAMES[axes['position']]}) {axes['granularity']} "
                     f"{axes['sharing']} {axes['form']} {axes['activation']}"
                     + ("" if axes["input_dependent"] else " input-independent"))
    if changes:
        parts.append(", ".join(f"{k}={v}" for k, v in changes.items()))
    return " + ".join(parts) or "-"


def _budget(row: dict) -> str:
    """'K+V 0.729x (paper 0.755x) r11' or 'G1 1.00x (0.25x) G1hw 64x (31x)': ours (paper's)."""
    b = row["budget"]
    if b is None:
        return ""
    if "replaced" in b:
        return (f"{b['replaced']} {b['added_over_replaced']:.3f}x ({b['paper_added_over_replaced']:.3f}x)"
                + (f" r{b['expert_rank']}" if b["expert_rank"] else ""))
    return (f"G1 {b['added_over_g1_elementwise']:.2f}x ({b['paper_added_over_g1_elementwise']:.2f}x) "
            f"G1hw {b['added_over_g1_headwise']:.0f}x ({b['paper_added_over_g1_headwise']:.0f}x)")


def format_table(rows: list[dict], wide: bool = False) -> str:
    """The variants in aligned columns: their paper row, the paper's delta-PPL and the
    parameters each adds, ours at the preset and the paper's. The terminal's table stops
    there (at most 120 columns, TERMINAL_COLUMNS); `wide` adds the parameter budget and the
    gate axes or model changes (`--out`)."""
    preset = rows[0]["preset"] if rows else ""
    lines = [f"{'slug':44} {'in paper':9} {'paper dPPL':>10} {'added @' + preset:>14} "
             f"{'paper added':>11}" + (f"  {'budget: ours (paper)':36}  axes / changes" if wide
                                       else "")]
    for r in rows:
        added = f"{r['params_added']:,}" if r["available"] else "n/a"
        delta = "" if r["paper_delta_ppl"] is None else f"{r['paper_delta_ppl']:+.3f}"
        paper_added = "" if r["paper_added_m"] is None else f"{r['paper_added_m']:g}M"
        line = f"{r['slug']:44} {r['paper']:9} {delta:>10} {added:>14} {paper_added:>11}"
        if wide:
            note = "" if r["available"] else f"  [{r['unavailable_reason']}]"
            line += f"  {_budget(r):36}  {_what(r)}{note}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def print_variants(preset: str, as_json: bool = False, gate: str | None = None,
                   out: str | None = None) -> None:
    rows = describe_variants(preset, gate)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(format_table(rows))
    print()
    for r in rows:  # (why a row is n/a: below the table rather than past its last column)
        if not r["available"]:
            print(clip(f"n/a: {r['unavailable_reason']}"))
    if out:
        Path(out).write_text(format_table(rows, wide=True) + "\n")
        print(f"with each variant's parameter budget and gate axes or model changes: {out}")
    else:
        print("each variant's parameter budget and gate axes or model changes: "
              "--out FILE (this table in full) or --json")
