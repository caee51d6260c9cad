"""`gatelab variants`: the registry as a table or JSON, with parameters added at a preset."""

from __future__ import annotations

import json

from lab.config import resolve
from lab.gates import VARIANTS, custom_variant, parse_gate


def describe_variants(preset: str, gate: str | None = None) -> list[dict]:
    from lab.run import count_params

    variants = [custom_variant(parse_gate(gate))] if gate else list(VARIANTS.values())
    rows = []
    for variant in variants:
        row = {"slug": variant.slug, "axes": variant.gate.axes() if variant.gate else None,
               "model_changes": variant.model, "paper": variant.paper,
               "paper_delta_ppl": variant.paper_delta_ppl, "description": variant.description,
               "available": True, "params_added": None}
        try:
            row["params_added"] = count_params(resolve(variant, preset))["added"]
        except Exception as err:  # e.g. an MoE-only variant at a dense preset
            row["available"], row["unavailable_reason"] = False, str(err)
        rows.append(row)
    return rows


def print_variants(preset: str, as_json: bool = False, gate: str | None = None) -> None:
    rows = describe_variants(preset, gate)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'slug':44} {'paper':9} {'paper dPPL':>10} {'added @' + preset:>14}  axes / changes")
    for r in rows:
        axes = r["axes"]
        what = (f"{axes['position']} {axes['granularity']} {axes['sharing']} {axes['form']} "
                f"{axes['activation']}" + ("" if axes["input_dependent"] else " input-independent")
                if axes else (", ".join(f"{k}={v}" for k, v in r["model_changes"].items()) or "-"))
        if r["model_changes"] and axes:
            what += " + " + ", ".join(f"{k}={v}" for k, v in r["model_changes"].items())
        added = f"{r['params_added']:,}" if r["available"] else "n/a"
        delta = "" if r["paper_delta_ppl"] is None else f"{r['paper_delta_ppl']:+.3f}"
        print(f"{r['slug']:44} {r['paper']:9} {delta:>10} {added:>14}  {what}"
              + ("" if r["available"] else f"  [{r['unavailable_reason']}]"))
