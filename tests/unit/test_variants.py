"""lab/reports/variants.py and the registry's user-facing side: `gatelab variants`, the grid files
in ablations/, bad variant/preset/gate input at the CLI, and the G1 parameter report of
`gatelab train`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lab.cli import main
from lab.config import resolve
from lab.errors import LabError
from lab.model.variants import VARIANTS
from lab.model.params import count_params
from lab.reports.variants import describe_variants
from test_gates import SPEC_SLUGS  # pytest puts tests/ on sys.path

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_variants_json_lists_every_spec_slug_with_paper_and_params(capsys):
    rows = {r["slug"]: r for r in json.loads(run_cli(capsys, "variants", "--json"))}
    assert set(SPEC_SLUGS) <= set(rows)
    g1 = rows["sdpa_elementwise_sigmoid_mul"]
    assert g1["axes"]["position"] == "sdpa" and g1["axes"]["granularity"] == "elementwise"
    assert (g1["paper"], g1["paper_table"], g1["paper_row"]) == ("T1-5", "Table 1", 5)
    assert g1["paper_delta_ppl"] == pytest.approx(-0.265)
    assert g1["params_added"] == 2 * 64 * 64  # tiny: L x d_model x (q heads x head_dim)
    assert all(row["available"] for slug, row in rows.items() if VARIANTS[slug].needs is None)
    assert rows["value_headwise_sigmoid_mul"]["params_added"] == 2 * 64 * 2  # L x d x kv


def test_moe_only_variant_says_it_needs_an_moe_preset(capsys):
    row = next(r for r in json.loads(run_cli(capsys, "variants", "--json"))
               if r["slug"] == "baseline_add4experts")
    assert row["needs"] == "moe" and not row["available"] and row["params_added"] is None
    assert "needs an MoE preset" in row["unavailable_reason"]
    assert "needs an MoE preset" in run_cli(capsys, "variants")


def test_variants_table_shows_slug_paper_delta_and_added_params_at_the_preset(capsys):
    text = run_cli(capsys, "variants", "--preset", "small")
    table = text.split("\n\n")[0]  # (then why a row is n/a, and where the full table is)
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert set(lines) == set(VARIANTS)
    assert "added @small" in text.splitlines()[0]
    headwise = lines["sdpa_headwise_sigmoid_mul"].split()
    assert headwise[1:4] == ["T1-10", "-0.234", f"{6 * 384 * 6:,}"]  # L x d x q at small


def test_variants_describes_an_unnamed_gate_by_axes(capsys):
    rows = json.loads(run_cli(capsys, "variants", "--json", "--gate",
                              "position=sdpa,granularity=headwise,form=additive,activation=silu"))
    assert len(rows) == 1
    assert rows[0]["axes"]["form"] == "additive" and rows[0]["params_added"] == 2 * 64 * 4


def test_unknown_preset_is_an_error_not_a_table_of_unavailable_rows():
    with pytest.raises(LabError, match="preset: 'huge' is not one of tiny"):
        describe_variants("huge")


# --- bad input at the command line ----------------------------------------------------------

BAD_INPUT = [
    (["train", "--variant", "sdpa_gate_everywhere"], "unknown variant 'sdpa_gate_everywhere'"),
    (["train", "--variant", "baseline", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--gate", "position=sdpa,activation=tanh"], "gate.activation: 'tanh'"),
    (["variants", "--gate", "position=G9"], "gate.position: 'G9'"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GATELAB_STORE", raising=False)
    assert main([*argv, "--data", "synthetic"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no data cache


@pytest.mark.slow
def test_python_m_lab_bad_variant_exits_2_without_traceback_or_store(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "GATELAB_STORE", "GATELAB_CACHE")}
    env["PYTHONPATH"] = str(REPO)  # this checkout's `lab`, whatever is installed
    argv, message = BAD_INPUT[0]
    result = subprocess.run([sys.executable, "-m", "lab", *argv, "--data", "synthetic"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_reports_g1_adds_layers_x_dmodel_x_query_width(tmp_path, monkeypatch, capsys):
    """Issue 2's acceptance, through `gatelab train` itself (one step on a small prepared
    synthetic corpus in a temporary store)."""
    from lab.data.store import prepare_synthetic

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    store = prepare_synthetic(512, train_tokens=20_000, root=tmp_path / "cache")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--preset", "tiny", "--data", str(store.path), "--tokens", "2048",
              "--set", "train.val_batches=1", "--tracking-uri", uri]
    out = run_cli(capsys, "train", "--variant", "sdpa_elementwise_sigmoid_mul", *common)
    report = next(line for line in out.splitlines() if "parameters:" in line)
    m = resolve("baseline", "tiny").model
    added = m.n_layers * m.d_model * m.n_heads * m.head_dim
    baseline_total = count_params(resolve("baseline", "tiny"))["total"]
    assert f"{baseline_total + added:,} total" in report
    assert f"{added:,} added over baseline" in report


def test_a_variant_added_to_the_registry_alone_is_listed_trained_and_exported(
        tmp_path, monkeypatch, capsys):
    """Issue 41: a variant that is a point of the gate space is one entry of
    lab/model/variants.py and nothing else. Added here to the registry only, it is listed by
    `gatelab variants --json` with its parameters, trains one step on the CPU through
    `gatelab train --variant`, and exports to the reference Qwen3 layout."""
    from lab.data.store import prepare_synthetic
    from lab.export import load_hf
    from lab.model.gates import GateSpec
    from lab.model.variants import Variant

    slug = "sdpa_headwise_sigmoid_mul_zeroinit"
    monkeypatch.setitem(VARIANTS, slug, Variant(
        slug, GateSpec(granularity="headwise", init="zeros"), short="G1 headwise, zero init",
        paper="T1-10", description="G1 headwise, the gate logits' weights starting at 0"))
    rows = {r["slug"]: r for r in json.loads(run_cli(capsys, "variants", "--json"))}
    assert rows[slug]["axes"]["init"] == "zeros"
    assert rows[slug]["params_added"] == 2 * 64 * 4  # tiny: L x d_model x query heads

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = prepare_synthetic(512, train_tokens=20_000, root=tmp_path / "cache")
    out = run_cli(capsys, "train", "--variant", slug, "--preset", "tiny", "--data",
                  str(store.path), "--tokens", str(4 * 128), "--set", "train.batch_size=4",
                  "--set", "train.val_batches=1", "--set", "train.analysis_windows=0", "--quiet")
    run_id = out.split()[1].rstrip(":")
    assert "from the final checkpoint" in run_cli(capsys, "export", run_id, "--out",
                                                  str(tmp_path / "hf"))
    gate = load_hf(tmp_path / "hf").cfg.gate
    assert (gate.position, gate.granularity) == ("sdpa", "headwise")


# --- the grid files ---------------------------------------------------------------------------

CORE = ["baseline", "sdpa_elementwise_sigmoid_mul", "sdpa_headwise_sigmoid_mul",
        "value_elementwise_sigmoid_mul", "key_elementwise_sigmoid_mul",
        "query_elementwise_sigmoid_mul", "denseout_elementwise_sigmoid_mul",
        "sdpa_elementwise_headshared_sigmoid_mul", "sdpa_elementwise_silu_add",
        "sdpa_elementwise_nssigmoid_mul", "sdpa_input_independent_sigmoid_mul",
        "sdpa_perhead_rmsnorm"]


def load_grid(name: str) -> dict:
    grid = yaml.safe_load((REPO / "ablations" / f"{name}.yaml").read_text())
    assert {"name", "preset", "data", "tokens", "variants", "seeds", "lrs"} <= set(grid)
    return grid


def _resolves(grid: dict) -> None:
    for slug in grid["variants"]:
        for lr in grid["lrs"]:
            resolve(slug, grid["preset"], grid.get("overrides"), data=grid["data"],
                    tokens=float(grid["tokens"]), lr=float(lr), seed=grid["seeds"][0])


def test_core_grid_is_the_issue_list_and_resolves():
    grid = load_grid("core")
    assert grid["name"] == "core" and grid["variants"] == CORE and len(grid["seeds"]) == 3
    _resolves(grid)


def test_paper_grid_has_every_dense_paper_variant_and_resolves():
    grid = load_grid("paper")
    assert len(grid["variants"]) == len(set(grid["variants"]))
    dense = {slug for slug, v in VARIANTS.items() if v.needs != "moe"}
    assert set(grid["variants"]) == dense  # the MoE-only baseline_add4experts is left out
    assert set(SPEC_SLUGS) - set(grid["variants"]) == {"baseline_add4experts"}
    _resolves(grid)


# --- budgets: Switch Head and the parameter-matched baselines against the paper (issue 24) ----

SWITCH_HEADS = [slug for slug, v in VARIANTS.items() if "switch_head" in v.model]
MATCHED = [slug for slug, v in VARIANTS.items() if v.budget_of]


def test_variants_json_gives_every_budget_row_its_added_parameters_and_ratio_to_the_paper(capsys):
    rows = {r["slug"]: r for r in json.loads(run_cli(capsys, "variants", "--preset", "small",
                                                     "--json"))}
    assert len(SWITCH_HEADS) == 5 and len(MATCHED) == 5
    for slug in SWITCH_HEADS + MATCHED:
        row = rows[slug]
        if not row["available"]:  # baseline_add4experts at a dense preset
            assert slug == "baseline_add4experts" and row["budget"] is None
            continue
        assert row["params_added"] > 0 and row["budget"]["ratio_to_paper"] > 0, slug
    # Switch Head: added over the replaced projections (small: K+V = 6 x 2 x 384 x 192).
    kv8top8 = rows["switchhead_kv_8top8"]["budget"]
    assert kv8top8["replaced"] == "K+V" and kv8top8["replaced_params"] == 6 * 2 * 384 * 192
    assert kv8top8["added_over_replaced"] == pytest.approx(
        rows["switchhead_kv_8top8"]["params_added"] / kv8top8["replaced_params"], abs=1e-4)
    assert kv8top8["paper_added_over_replaced"] == pytest.approx(38 / 50.33, abs=1e-3)
    for slug in SWITCH_HEADS:
        if slug != "switchhead_v_1top1":  # one rank step of the paper's share at small
            assert 0.85 < rows[slug]["budget"]["ratio_to_paper"] < 1.15, slug
    # v 1top1 stays the value headwise gate: its router only, not Table 6's unexplained 3M.
    assert rows["switchhead_v_1top1"]["params_added"] == rows["value_headwise_sigmoid_mul"]["params_added"]
    # Matched baselines: against G1 elementwise's and headwise's added parameters.
    g1 = rows["sdpa_elementwise_sigmoid_mul"]["params_added"]
    budgets = {slug: rows[slug]["budget"] for slug in MATCHED if rows[slug]["available"]}
    assert all(b["g1_elementwise_added"] == g1 for b in budgets.values())
    assert all(b["g1_headwise_added"] == rows["sdpa_headwise_sigmoid_mul"]["params_added"]
               for b in budgets.values())
    assert budgets["baseline_q48"]["ratio_to_paper"] == pytest.approx(1.0)       # Q+O = G1
    assert budgets["baseline_kv8"]["added_over_g1_elementwise"] == 1.0           # 2:1 GQA -> MHA
    assert budgets["baseline_kv8"]["paper_added_over_g1_elementwise"] == pytest.approx(50 / 201, abs=1e-4)
    assert budgets["baseline_kv8"]["ratio_to_paper"] > 3.9                       # the mismatch
    assert budgets["baseline_ffn_kv8params"]["ratio_to_paper"] == pytest.approx(1.0, abs=0.01)
    assert budgets["baseline_ffn_g1params"]["ratio_to_paper"] == pytest.approx(1.0, abs=0.01)


def test_add4experts_budget_is_given_at_an_moe_preset():
    rows = {r["slug"]: r for r in describe_variants("moe-tiny")}
    budget = rows["baseline_add4experts"]["budget"]
    assert budget["matches_paper"] == "baseline_add4experts"
    assert budget["paper_added_over_g1_elementwise"] == pytest.approx(400 / 201, abs=1e-3)
    assert budget["added_over_g1_elementwise"] == pytest.approx(
        rows["baseline_add4experts"]["params_added"] / rows["sdpa_elementwise_sigmoid_mul"]["params_added"],
        abs=1e-4)


def test_variants_table_shows_the_papers_added_parameters_and_the_budgets(capsys, tmp_path):
    """The budgets are in the full table (`--out FILE`); the terminal's stops at 120 columns."""
    run_cli(capsys, "variants", "--preset", "small", "--out", str(tmp_path / "full.txt"))
    text = (tmp_path / "full.txt").read_text()
    assert "budget: ours (paper)" in text.splitlines()[0]
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "38M" in lines["switchhead_kv_8top8"].split()
    assert "K+V 0.729x (0.755x) r11" in lines["switchhead_kv_8top8"]
    assert "G1 1.00x (0.25x) G1hw 64x (31x)" in lines["baseline_kv8"]
    assert "G1 0.25x (0.25x)" in lines["baseline_ffn_kv8params"]


def test_reproduction_grid_uses_the_matched_baselines_that_keep_the_papers_budget():
    grid = load_grid("reproduce")
    assert {"baseline_q48", "baseline_ffn_kv8params"} <= set(grid["variants"])
    _resolves(grid)


# Each control grid and what it changes of the grid it controls; everything else must be the
# same (corpus, tokens, seeds, cadence), which `extends` keeps true when the grid changes.
CONTROLS = {
    "reproduce-init": ("reproduce", {"variants", "overrides"}, {"model.residual_init_scale": 0.2887}),
    "reproduce-lr": ("reproduce", {"variants", "lrs"}, {}),
    "reproduce-base-init": ("reproduce-base", {"variants", "overrides"},
                            {"model.residual_init_scale": 0.2041}),
    "reproduce-base-lr": ("reproduce-base", {"variants", "lrs"}, {}),
    "reproduce-base-steps": ("reproduce-base-init", {"variants", "overrides"}, {"train.batch_size": 32}),
    "stability-noqk": ("stability", {"overrides"}, {"model.qk_norm": False}),
}


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_a_control_grid_differs_from_its_grid_only_in_what_it_controls(control):
    from lab.experiments.schema import load_grid as load_spec

    parent_name, changed, added_overrides = CONTROLS[control]
    child = load_spec(REPO / "ablations" / f"{control}.yaml").to_dict()
    parent = load_spec(REPO / "ablations" / f"{parent_name}.yaml").to_dict()
    assert child["name"] == control != parent["name"]
    same = set(parent) - changed - {"name"}
    assert {k: child[k] for k in same} == {k: parent[k] for k in same}
    assert set(child["variants"]) <= set(parent["variants"])
    assert child["overrides"] == {**parent["overrides"], **added_overrides}
    if "lrs" in changed:
        assert child["lrs"] != parent["lrs"]
    # The depth-scaled init is GPT-2's 1 / sqrt(2 x layers) at the grid's preset.
    if "model.residual_init_scale" in added_overrides:
        layers = resolve("baseline", parent["preset"]).model.n_layers
        assert added_overrides["model.residual_init_scale"] == pytest.approx(
            (2 * layers) ** -0.5, abs=1e-4)
