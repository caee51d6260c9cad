"""`gatelab variants`: the registry as a table or JSON, with parameters added at a preset.

Each row: the slug, its gate axes (or the architecture changes of a control), the
parameters it adds over the baseline at the chosen preset (counted on the meta device,
so even `xl` costs no memory), the paper's table and row, and the paper's delta-PPL
where it reports one. A variant that cannot be built at the preset (the MoE-only
`baseline_add4experts` at a dense preset) is listed as unavailable with the reason.
"""

from __future__ import annotations

import json

from lab.config import PRESETS, resolve
from lab.errors import LabError, check_choice
from lab.gates import PAPER_POSITION_NAMES, VARIANTS, Variant, custom_variant, parse_gate


def describe_variant(variant: Variant, preset: str) -> dict:
    from lab.run import count_params

    row = {"slug": variant.slug, "axes": variant.gate.axes() if variant.gate else None,
           "model_changes": variant.model, "q_heads_factor": variant.q_heads_factor,
           "kv_heads_factor": variant.kv_heads_factor, "paper": variant.paper,
           "paper_table": variant.paper_table, "paper_row": variant.paper_row,
           "paper_ppl": variant.paper_ppl, "paper_delta_ppl": variant.paper_delta_ppl,
           "paper_gate_mean": variant.paper_gate_mean,
           "paper_first_token_attn": variant.paper_first_token_attn,
           "paper_max_activation": variant.paper_max_activation,
           "description": variant.description, "needs": variant.needs, "preset": preset,
           "available": True, "unavailable_reason": None,
           "params_total": None, "params_added": None}
    try:
        counts = count_params(resolve(variant, preset))
        row["params_total"], row["params_added"] = counts["total"], counts["added"]
    except LabError as err:  # e.g. the MoE-only variant at a dense preset
        row["available"], row["unavailable_reason"] = False, str(err)
    return row


def describe_variants(preset: str, gate: str | None = None) -> list[dict]:
    check_choice("preset", preset, tuple(PRESETS))
    variants = [custom_variant(parse_gate(gate))] if gate else list(VARIANTS.values())
    return [describe_variant(variant, preset) for variant in variants]


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


def format_table(rows: list[dict]) -> str:
    preset = rows[0]["preset"] if rows else ""
    lines = [f"{'slug':44} {'paper':9} {'paper dPPL':>10} {'added @' + preset:>14}  axes / changes"]
    for r in rows:
        added = f"{r['params_added']:,}" if r["available"] else "n/a"
        delta = "" if r["paper_delta_ppl"] is None else f"{r['paper_delta_ppl']:+.3f}"
        note = "" if r["available"] else f"  [{r['unavailable_reason']}]"
        lines.append(f"{r['slug']:44} {r['paper']:9} {delta:>10} {added:>14}  {_what(r)}{note}")
    return "\n".join(lines)


def print_variants(preset: str, as_json: bool = False, gate: str | None = None) -> None:
    rows = describe_variants(preset, gate)
    print(json.dumps(rows, indent=2) if as_json else format_table(rows))
