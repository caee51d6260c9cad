"""lab/variants.py and the registry's user-facing side: `gatelab variants`, the grid files
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
from lab.gates import VARIANTS
from lab.run import count_params
from lab.variants import describe_variants
from test_gates import SPEC_SLUGS  # pytest puts tests/ on sys.path

REPO = Path(__file__).resolve().parents[1]


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
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
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


def test_train_reports_g1_adds_layers_x_dmodel_x_query_width(tmp_path, monkeypatch, capsys):
    """Issue 2's acceptance, through `gatelab train` itself (one step on a small prepared
    synthetic corpus in a temporary store)."""
    from lab.data import prepare_synthetic

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
    dense = {slug for slug, v in VARIANTS.items() if v.needs is None}
    assert set(grid["variants"]) == dense  # the MoE-only baseline_add4experts is left out
    assert set(SPEC_SLUGS) - set(grid["variants"]) == {"baseline_add4experts"}
    _resolves(grid)
