"""lab/reports/grid_report.py: statistics over seeds, paired deltas, the paper's deltas, files and plots,
on a grid written straight into MLflow (no training: the numbers are chosen)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from lab.analysis import outputs
from lab.errors import LabError
from lab.reports.seeds import RunRecord

T_975_DF2 = 4.302652729911275  # two-sided 95% t quantile, 2 degrees of freedom

PPL = {  # (variant, lr) -> val/ppl by seed 0, 1, 2 (None: diverged)
    ("baseline", 3e-3): [10.0, 10.4, 10.2],
    ("baseline", 1e-3): [11.0, 11.2, 11.1],
    ("sdpa_elementwise_sigmoid_mul", 3e-3): [9.5, 9.8, 9.9],
    ("key_elementwise_sigmoid_mul", 3e-3): [10.1, 10.3, 10.3],
    ("value_elementwise_sigmoid_mul", 3e-3): [9.9, 10.0, None],
}


def write_grid(uri: str, name: str = "fake", ppl: dict | None = None,
               layer_table: bool = False) -> str:
    """A fake grid; its per-layer values as `layers/...` metrics (as runs before 2026-12-05
    hold them) or, with `layer_table`, as the table runs log now."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    from lab import records
    from lab.records import find_or_create_grid_parent
    from lab.records import cell_name

    client = MlflowClient(uri)
    experiment = records.experiment_id(client, name, uri)
    parent = find_or_create_grid_parent(client, experiment, name)

    def run(variant, lr, seed, ppl, status="FINISHED"):
        tags = {MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: cell_name(variant, lr, seed),
                "variant": variant, "lr": f"{lr:g}", "seed": str(seed),
                "config_hash": f"{variant}-{lr}-{seed}", "diverged": str(ppl is None).lower()}
        run_id = client.create_run(experiment, tags=tags).info.run_id
        metrics = {"spikes/count": 1 if variant == "baseline" else 0,
                   "spikes/max_excess": 0.3 if variant == "baseline" else 0.0}
        if ppl is not None:
            metrics.update({"val/ppl": ppl, "val/final_loss": math.log(ppl)})
        if variant.startswith("sdpa"):
            metrics["gate/mean"] = 0.1 + seed / 100
            metrics["long/ppl_4x_yarn"] = 20.0 + seed
            for layer in range(3):  # zero-padded as in a model of 10 or more layers
                metrics[f"layers/sink/first_token_attn/layer_{layer:02d}"] = 0.1 * layer + seed / 100
                metrics[f"layers/act/max/layer_{layer}"] = 10.0 ** layer
        if layer_table:
            client.log_dict(run_id, outputs.layer_table(metrics), outputs.LAYER_TABLE)
            metrics = {k: v for k, v in metrics.items() if not k.startswith("layers/")}
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.log_dict(run_id, {"step": [1, 2, 3], "loss": [6.0, 5.0 + seed, 4.0]},
                        "loss_history.json")
        client.log_dict(run_id, [{"start_step": 2, "peak_step": 2, "end_step": 2,
                                  "max_excess": 0.3}] if variant == "baseline" else [],
                        "spikes.json")
        client.set_terminated(run_id, status)
        return run_id

    for (variant, lr), values in (PPL if ppl is None else ppl).items():
        for seed, value in enumerate(values):
            run(variant, lr, seed, value)
    # Neither a failed attempt nor a stale duplicate of a cell may count.
    run("sdpa_elementwise_sigmoid_mul", 3e-3, 0, 1.0, status="FAILED")
    return parent


@pytest.mark.slow
@pytest.mark.parametrize("layer_table", [False, True], ids=["metrics (older runs)", "table"])
def test_the_per_layer_profiles_read_alike_from_metrics_and_from_the_table(store, tmp_path,
                                                                            layer_table):
    """Runs since 2026-12-05 keep their per-layer values as one table, older runs (the
    committed snapshots) as `layers/...` metrics: the report reads both the same."""
    from mlflow.tracking import MlflowClient

    from lab.reports.figures import layer_profile
    from lab.reports.grid_report import build_report

    write_grid(store, layer_table=layer_table)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("fake").experiment_id
    held = {m for r in client.search_runs([experiment]) for m in r.data.metrics}
    assert any(m.startswith("layers/") for m in held) != layer_table
    report = build_report("fake", store, tmp_path / "out")
    gate = next(r for r in report.rows if r.variant == "sdpa_elementwise_sigmoid_mul")
    assert layer_profile(gate.runs, "layers/sink/first_token_attn") == pytest.approx(
        [0.01, 0.11, 0.21])
    assert layer_profile(gate.runs, "layers/act/max") == pytest.approx([1.0, 10.0, 100.0])
    assert (tmp_path / "out" / "per_layer.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_report_statistics_deltas_and_the_papers_direction(store, tmp_path):
    from lab.reports.grid_report import build_report

    parent = write_grid(store)
    report = build_report("fake", store, tmp_path / "out")
    rows = {r.variant: r for r in report.rows}
    assert list(rows) == ["baseline", "sdpa_elementwise_sigmoid_mul",
                          "value_elementwise_sigmoid_mul", "key_elementwise_sigmoid_mul"]
    assert rows["baseline"].lr == 3e-3  # the better of its two LRs

    gate = rows["sdpa_elementwise_sigmoid_mul"]
    assert gate.ppl.mean == pytest.approx(29.2 / 3)
    assert gate.ppl.std == pytest.approx(0.2081666, rel=1e-6)
    half = T_975_DF2 * 0.2081666 / math.sqrt(3)
    assert (gate.ppl.low, gate.ppl.high) == pytest.approx((29.2 / 3 - half, 29.2 / 3 + half),
                                                          rel=1e-6)
    # Paired by seed: (-0.5, -0.6, -0.3).
    assert gate.delta.mean == pytest.approx(-1.4 / 3)
    half = T_975_DF2 * 0.1527525 / math.sqrt(3)
    assert (gate.delta.low, gate.delta.high) == pytest.approx((-1.4 / 3 - half, -1.4 / 3 + half),
                                                              rel=1e-6)
    # A dense preset: the paper's dense Table 2 (48 layers, 400B, LR 4e-3: 7.288 - 7.421),
    # with the MoE Table 1's number kept beside it.
    assert gate.paper_delta == pytest.approx(-0.133) and gate.direction == "yes"
    assert gate.paper_table == "dense" and gate.paper_moe == pytest.approx((-0.265, 6.026))
    # Relative to each side's baseline: ours 10.2, the paper's 7.421.
    assert gate.delta_percent == pytest.approx(100 * (-1.4 / 3) / 10.2)
    assert gate.paper_delta_percent == pytest.approx(100 * -0.133 / 7.421)
    assert gate.extra == {"gate/mean": pytest.approx(0.11), "long/ppl_4x_yarn": pytest.approx(21.0)}

    # (+0.1, -0.1, +0.1): the paper's sign is negative; our interval spans zero.
    assert rows["key_elementwise_sigmoid_mul"].direction == "no (CI spans 0)"
    value = rows["value_elementwise_sigmoid_mul"]
    assert value.diverged == 1 and value.ppl.n == 2 and value.delta.n == 2
    assert rows["baseline"].spikes == 3 and rows["baseline"].direction == "-"

    text = report.markdown
    for variant in rows:
        assert f"| {variant} |" in text
    assert "| 1/3 |" in text and "gate/mean" in text and "long/ppl_4x_yarn" in text
    assert "| -4.6% | -0.133 (-1.8%) | yes |" in text
    assert next(line for line in text.splitlines() if line.startswith(
        "| sdpa_elementwise_sigmoid_mul |")).endswith("| dense | -0.265 (-4.4%) | -0.133 (-1.8%) |")
    # Two LRs of the baseline: the table of every (variant, LR) follows the best-LR table.
    every_lr = text.split("### Every learning rate")[1]
    assert "| baseline | 0.001 |" in every_lr and "| baseline | 0.001 |" not in text.split("###")[0]

    with open(tmp_path / "out" / "report.csv") as handle:
        table = {r["variant"]: r for r in csv.DictReader(handle)}
    assert float(table["sdpa_elementwise_sigmoid_mul"]["delta_ppl_mean"]) == pytest.approx(-1.4 / 3)
    g1_row = table["sdpa_elementwise_sigmoid_mul"]
    assert (g1_row["paper_delta_ppl"], g1_row["paper_delta_table"], g1_row["paper_moe_delta_ppl"],
            g1_row["paper_dense_delta_ppl"]) == ("-0.133", "dense", "-0.265", "-0.133")
    # The key gate has no dense number: the MoE one, so named.
    assert (table["key_elementwise_sigmoid_mul"]["paper_delta_table"],
            table["key_elementwise_sigmoid_mul"]["paper_dense_delta_ppl"]) == ("MoE", "")
    assert table["value_elementwise_sigmoid_mul"]["diverged"] == "1"
    with open(tmp_path / "out" / "all_lrs.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(PPL)

    from lab.reports.figures import layer_profile

    assert layer_profile(gate.runs, "layers/sink/first_token_attn") == pytest.approx([0.01, 0.11, 0.21])
    assert layer_profile(rows["baseline"].runs, "layers/act/max") == []
    for name in ("loss_curves.png", "delta_ppl.png", "lr_vs_loss.png", "per_layer.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    from mlflow.tracking import MlflowClient

    logged = {a.path for a in MlflowClient(store).list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.csv", "report/delta_ppl.png"} <= logged


# A control grid: the baseline with one setting changed, at two LRs (the better one counts),
# and a seed the main grid does not have (left out of the pairing).
CONTROL_PPL = {("baseline", 3e-3): [9.6, 9.7, 9.8, 9.0], ("baseline", 1e-3): [12.0, 12.0, 12.0, 12.0]}


def report_with_control(store, out, control_ppl):
    """The fake grid and a control grid `fake-init` of `control_ppl`, reported into `out`
    against it; returns the report and its control section of report.md."""
    from lab.reports.grid_report import build_report

    write_grid(store)
    write_grid(store, "fake-init", control_ppl)
    report = build_report("fake", store, out, control="fake-init")
    section = report.markdown.split("### Against the control grid fake-init")[1].split("###")[0]
    return report, section


@pytest.mark.slow
def test_a_control_grid_gives_every_variant_a_second_delta_paired_by_seed(store, tmp_path):
    from lab.reports.grid_report import build_report

    out = tmp_path / "out"
    report, section = report_with_control(store, out, CONTROL_PPL)
    lines = {line.split(" | ")[0].strip("| "): line for line in section.splitlines()
             if line.startswith("| ") and "fake-init:" in line}
    assert set(lines) == {r.variant for r in report.rows}
    # G1 (9.5, 9.8, 9.9) against the control's 3e-3 baseline (9.6, 9.7, 9.8): (-0.1, +0.1, +0.1)
    gate = lines["sdpa_elementwise_sigmoid_mul"]
    assert "fake-init:baseline lr=0.003" in gate and "| +0.033 ± 0.115 |" in gate
    assert gate.endswith("| 3 | - |")  # seeds paired; no change of Δ: the control lacks G1
    with open(out / "control.csv") as handle:
        table = {r["variant"]: r for r in csv.DictReader(handle)}
    half = T_975_DF2 * 0.1154701 / math.sqrt(3)
    g1 = table["sdpa_elementwise_sigmoid_mul"]
    assert float(g1["delta_ppl_mean"]) == pytest.approx(0.1 / 3)
    assert (float(g1["delta_ppl_ci_low"]), float(g1["delta_ppl_ci_high"])) == pytest.approx(
        (0.1 / 3 - half, 0.1 / 3 + half), rel=1e-6)
    assert g1["control_lr"] == "0.003" and g1["seeds_paired"] == "3"
    # The baseline against its control: (10.0, 10.4, 10.2) - (9.6, 9.7, 9.8)
    assert float(table["baseline"]["delta_ppl_mean"]) == pytest.approx(1.5 / 3)
    assert table["value_elementwise_sigmoid_mul"]["seeds_paired"] == "2"  # one seed diverged

    # A later report without the control leaves no stale control.csv behind.
    build_report("fake", store, out)
    assert not (out / "control.csv").exists()


# A control grid that holds a gate too (as reproduce-base-init holds G1): the same 3e-3
# baseline, and G1 with the control's setting.
CONTROL_GATE_PPL = {("baseline", 3e-3): [9.6, 9.7, 9.8],
                    ("sdpa_elementwise_sigmoid_mul", 3e-3): [9.2, 9.6, 9.4]}


@pytest.mark.slow
def test_a_control_grid_pairs_each_variant_with_its_own_variant_else_its_baseline(store, tmp_path):
    out = tmp_path / "out"
    report, section = report_with_control(store, out, CONTROL_GATE_PPL)
    with open(out / "control.csv") as handle:
        table = list(csv.DictReader(handle))
    # One row a variant of the grid, never a variant against a different gate of the control.
    assert sorted(r["variant"] for r in table) == sorted(r.variant for r in report.rows)
    assert all(r["control_variant"] in (r["variant"], "baseline") for r in table)
    by_variant = {r["variant"]: r for r in table}
    # G1 (9.5, 9.8, 9.9) against the control's G1 (9.2, 9.6, 9.4): (+0.3, +0.2, +0.5), one factor.
    g1 = by_variant["sdpa_elementwise_sigmoid_mul"]
    assert g1["control_variant"] == "sdpa_elementwise_sigmoid_mul"
    assert float(g1["delta_ppl_mean"]) == pytest.approx(1.0 / 3)
    assert g1["seeds_paired"] == "3" and g1["factors_changed"] == "setting"
    # the columns users read stay as they were, the new ones after them
    assert list(g1)[:12] == ["variant", "lr", "control_grid", "control_variant", "control_lr",
                             "control_val_ppl_mean", "delta_ppl_mean", "delta_ppl_std",
                             "delta_ppl_ci_low", "delta_ppl_ci_high", "seeds_paired",
                             "factors_changed"]
    # How G1's Δ vs the baseline changes with the setting: here (-0.5, -0.6, -0.3), in the
    # control (9.2-9.6, 9.6-9.7, 9.4-9.8) = (-0.4, -0.1, -0.4); per seed (-0.1, -0.5, +0.1).
    assert float(g1["delta_vs_baseline_change_mean"]) == pytest.approx(-0.5 / 3)
    low, high = float(g1["delta_vs_baseline_change_ci_low"]), float(g1["delta_vs_baseline_change_ci_high"])
    half = 4.302652729911275 * np.std([-0.1, -0.5, 0.1], ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert (low, high) == pytest.approx((-0.5 / 3 - half, -0.5 / 3 + half))
    # none for the baseline (its own reference) or a variant the control lacks
    assert by_variant["baseline"]["delta_vs_baseline_change_mean"] == ""
    # A gate the control lacks: against its baseline (9.6, 9.7, 9.8), (+0.5, +0.6, +0.5), two factors.
    key = by_variant["key_elementwise_sigmoid_mul"]
    assert key["control_variant"] == "baseline" and key["factors_changed"] == "setting + variant"
    assert key["delta_vs_baseline_change_mean"] == ""
    assert float(key["delta_ppl_mean"]) == pytest.approx(1.6 / 3)
    assert by_variant["baseline"]["factors_changed"] == "setting"
    # report.md says the same, row by row.
    lines = [line for line in section.splitlines() if "fake-init:" in line]
    assert len(lines) == len(report.rows)
    gate = next(line for line in lines if line.startswith("| sdpa_elementwise_sigmoid_mul |"))
    assert "fake-init:sdpa_elementwise_sigmoid_mul lr=0.003 | setting |" in gate
    assert "| +0.333 ± 0.153 |" in gate and gate.endswith("| -0.167 ± 0.306 [-0.926, +0.592] |")
    key_line = next(line for line in lines if line.startswith("| key_elementwise_sigmoid_mul |"))
    assert "fake-init:baseline lr=0.003 | setting + variant |" in key_line


@pytest.mark.slow
def test_a_control_that_is_missing_or_the_grid_itself_is_a_one_line_error(store, tmp_path, capsys,
                                                                         monkeypatch):
    from lab.cli import main

    write_grid(store)
    out = tmp_path / "out"
    assert main(["report", "fake", "--control", "fake", "--out", str(out)]) == 2
    assert "--control fake is the grid itself" in capsys.readouterr().err
    assert main(["report", "fake", "--control", "nothing", "--out", str(out)]) == 2
    assert "no grid named 'nothing'" in capsys.readouterr().err
    assert not out.exists()  # checked before anything is written
    # Among several grids the control is reported on its own, without a control.
    write_grid(store, "fake-init", CONTROL_PPL)
    monkeypatch.chdir(tmp_path)  # (several grids: each report goes to reports/<grid>)
    assert main(["report", "fake", "fake-init", "--control", "fake-init"]) == 0
    assert "### Against the control grid fake-init" in (tmp_path / "reports/fake/report.md").read_text()
    assert "### Against the control" not in (tmp_path / "reports/fake-init/report.md").read_text()
    assert not (tmp_path / "reports/fake-init/control.csv").exists()


def test_one_seed_has_no_interval_and_an_unknown_grid_is_a_lab_error(store, tmp_path):
    from lab.reports.grid_report import build_report
    from lab.reports.seeds import t_interval

    single = t_interval([3.0])
    assert single.mean == 3.0 and single.low is None and t_interval([]) is None
    with pytest.raises(LabError, match="no grid named 'nothing'"):
        build_report("nothing", store, tmp_path)


@pytest.mark.slow
def test_report_command_prints_every_variant(store, capsys, tmp_path):
    from lab.cli import main

    write_grid(store, "printed")
    assert main(["report", "printed", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert all(variant in names for variant, _ in PPL)
    # 120 columns at most; the full table is in the files the last line names
    assert max(len(line) for line in out.splitlines()) <= 120
    assert f"{tmp_path / 'r'}/report.md and report.csv" in out.splitlines()[-1]
    assert all(f"| {variant} |" in (tmp_path / "r" / "report.md").read_text() for variant, _ in PPL)


@pytest.mark.slow
def test_the_parent_run_carries_the_summary_and_the_cells_their_variants_colour(store, tmp_path):
    from lab import records
    from lab.reports.grid_report import build_report, terminal_summary

    parent = write_grid(store, "summary")
    report = build_report("summary", store, tmp_path / "out")
    client = records.client(store)
    run = client.get_run(parent)
    note = run.data.tags["mlflow.note.content"]
    assert "| variant | seeds | val PPL | Δ vs baseline | Δ 95% CI |" in note
    gate = next(r for r in report.rows if r.variant == "sdpa_elementwise_sigmoid_mul")
    assert f"| sdpa_elementwise_sigmoid_mul | 3 | {gate.ppl.mean:.3f} ± {gate.ppl.std:.3f} | " \
           f"{gate.delta.mean:+.3f} | [{gate.delta.low:+.3f}, {gate.delta.high:+.3f}] |" in note
    # The trend verdicts follow the table, those the grid cannot test left out: G1 beats the
    # baseline in every seed (p 0.034), but not after the adjustment over the report's
    # comparisons; the value, key and ≈ comparisons span both sides.
    assert "| 1 | position ranking: G1 > G2 >> G4 ≈ G3 ≈ G5 ≈ no gate (Table 1) | unresolved " \
           "(every adjusted comparison spans the paper's side and the other) |" in note
    assert "| 13 |" not in note
    metrics = run.data.metrics
    assert metrics["report/sdpa_elementwise_sigmoid_mul/delta_ppl_mean"] == pytest.approx(-1.4 / 3)
    assert metrics["report/sdpa_elementwise_sigmoid_mul/delta_ppl_ci_low"] == pytest.approx(gate.delta.low)
    assert metrics["report/baseline/val_ppl_mean"] == pytest.approx(10.2)
    assert "report/baseline/delta_ppl_mean" not in metrics  # the reference has no Δ
    colours = {}
    for row in report.all_rows:
        for record in row.runs:
            colours.setdefault(row.variant, set()).add(
                client.get_run(record.run_id).data.tags["mlflow.runColor"])
    assert all(len(c) == 1 for c in colours.values())  # one colour per variant, both LRs
    assert len({c.pop() for c in colours.values()}) == len(colours)  # and distinct ones
    lines = terminal_summary(report).splitlines()
    assert lines[0].split() == ["variant", "seeds", "val", "PPL", "Δ", "vs", "baseline", "Δ",
                                "95%", "CI"]
    assert len(lines) == 1 + len(report.rows) and "(reference)" in lines[1]


def test_with_one_learning_rate_there_is_no_copy_of_report_csv(store, tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules[__name__], "PPL", {("baseline", 3e-3): [10.0, 10.4],
                                                       ("sdpa_elementwise_sigmoid_mul", 3e-3):
                                                       [9.5, 9.8]})
    from lab.reports.grid_report import build_report

    write_grid(store, "one-lr")
    out = tmp_path / "out"
    out.mkdir()
    (out / "all_lrs.csv").write_text("stale, from a report with several LRs")
    report = build_report("one-lr", store, out)
    assert {f.name for f in report.files} == {"report.md", "report.csv", "loss_curves.png",
                                              "delta_ppl.png", "per_layer.png"}
    assert not (out / "all_lrs.csv").exists() and not (out / "lr_vs_loss.png").exists()


def test_stability_table_reads_the_largest_stable_lr_per_variant():
    from lab.reports.seeds import Row, RunRecord
    from lab.reports.tables import stability_table

    def row(variant, lr, diverged=(False, False), spikes=(0, 0), logit=None):
        runs = [RunRecord(f"{variant}{lr}{seed}", variant, lr, seed,
                          {"spikes/count": spikes[seed], "val/ppl": 10.0}, diverged[seed])
                for seed in (0, 1)]
        return Row(variant, lr, runs, None, extra={} if logit is None else {"attn/logit_max": logit})

    rows = [row("baseline", 1e-2, logit=12.0), row("baseline", 3e-2, spikes=(0, 2), logit=30.0),
            row("baseline", 1e-1, diverged=(False, True)), row("baseline", 3e-1, diverged=(True, True)),
            row("sdpa_elementwise_sigmoid_mul", 1e-2), row("sdpa_elementwise_sigmoid_mul", 3e-1, logit=8.0)]
    lines = {line.split(" | ")[0].strip("| "): line for line in stability_table(rows).splitlines()[2:]}
    # one diverged seed of two makes an LR unstable; a spike makes it stable but not calm
    # (the runs log no final loss: only a divergence breaks one)
    assert lines["baseline"] == "| baseline | 4 | 0.03 | 0.01 | 0.1 | 30.0 | 0.03 | 0.1 |"
    assert lines["sdpa_elementwise_sigmoid_mul"] == \
        "| sdpa_elementwise_sigmoid_mul | 2 | 0.3 | 0.3 | none | 8.0 | 0.3 | none |"


def test_an_moe_preset_takes_the_papers_moe_table():
    from lab.reports.rows import build_rows

    records = [RunRecord(f"{v}{seed}", v, 3e-3, seed, {"val/ppl": 10.0 - seed}, False, ffn)
               for v in ("baseline", "sdpa_headwise_sigmoid_mul", "baseline_sandwich_norm")
               for seed in (0, 1) for ffn in ("moe",)]
    rows = {r.variant: r for r in build_rows(records)[0]}
    headwise = rows["sdpa_headwise_sigmoid_mul"]
    assert (headwise.paper_table, headwise.paper_delta) == ("MoE", pytest.approx(-0.234))
    assert headwise.paper_dense == pytest.approx((-0.051, 7.421))
    # The sandwich norm's only number is Table 2's (against the baseline at LR 8e-3).
    sandwich = rows["baseline_sandwich_norm"]
    assert (sandwich.paper_table, sandwich.paper_moe) == ("dense", None)
    assert sandwich.paper_delta_percent == pytest.approx(100 * (7.407 - 9.195) / 9.195)


@pytest.mark.slow
def test_the_sink_through_training_is_tabulated_and_plotted_against_tokens(store, tmp_path):
    """Runs that log the sink measures every N steps (train.analysis_every): the report's
    table gives the mean over seeds at each step, in tokens trained (tokens/seen over the
    last step: 1,000 tokens a step here), and sink_vs_tokens.png plots them."""
    from mlflow.tracking import MlflowClient

    from lab.reports.grid_report import build_report

    write_grid(store, "sinks", {("baseline", 3e-3): [10.0, 10.4, 10.2],
                                ("sdpa_elementwise_sigmoid_mul", 3e-3): [9.5, 9.8, 9.9]})
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("sinks").experiment_id
    for run in client.search_runs([experiment], "tags.variant != ''"):
        if run.info.status != "FINISHED":
            continue
        seed, gated = int(run.data.tags["seed"]), run.data.tags["variant"] != "baseline"
        for step in (500, 1000):
            share = 0.05 if gated else step / 5000 + seed / 100
            client.log_metric(run.info.run_id, "sink/head_share_short", share, step=step)
            client.log_metric(run.info.run_id, "sink/first_token_attn", share / 10, step=step)
        client.log_metric(run.info.run_id, "tokens/seen", 1e6, step=1000)
    out = tmp_path / "out"
    report = build_report("sinks", store, out)
    section = report.markdown.split("### The sink through training")[1].split("###")[0]
    # The baseline at step 1,000 (1e6 tokens): shares 0.20, 0.21, 0.22, mean 0.21.
    assert "| baseline | 1e+06 | 0.210 | 0.021 | 3 |" in section
    assert "| baseline | 5e+05 | 0.110 | 0.011 | 3 |" in section
    assert "| sdpa_elementwise_sigmoid_mul | 1e+06 | 0.050 | 0.005 | 3 |" in section
    assert (out / "sink_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert out / "sink_vs_tokens.png" in report.files
    # Trend 7 reads the last value: the baseline's share 0.21 is a sink by the premise.
    seven = next(r for r in report.verdicts if r.trend.number == "7")
    assert not seven.verdict.startswith(("not testable", "not in this grid"))
    # A grid without such series: no plot (and none left from before).
    build_report("fake" if write_grid(store) else "", store, out)
    assert not (out / "sink_vs_tokens.png").exists()


def test_a_section_added_to_the_list_appears_in_report_md_in_its_place(store, tmp_path,
                                                                       monkeypatch):
    """report.md is its sections in the order of lab/reports/sections.py SECTIONS: a section
    put into that list (here at test time, between the plots and the learning rates) is in
    report.md at its place, its file is listed and logged to the grid's parent run with the
    others."""
    from mlflow.tracking import MlflowClient

    from lab.reports import sections
    from lab.reports.grid_report import build_report

    def seeds_per_variant(records):
        path = records.out_dir / "seeds.txt"
        path.write_text("\n".join(f"{r.variant} {len(r.runs)}" for r in records.rows))
        return sections.Section(f"\n### Seeds\n\n{len(records.rows)} variants\n", (path,))

    at = sections.SECTIONS.index(sections.plots) + 1
    monkeypatch.setattr(sections, "SECTIONS", [*sections.SECTIONS[:at], seeds_per_variant,
                                               *sections.SECTIONS[at:]])
    parent = write_grid(store)
    report = build_report("fake", store, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert text == report.markdown
    # after the variants' table (the plots add no text), before every learning rate
    assert text.index("| key_elementwise_sigmoid_mul |") < text.index("### Seeds\n\n4 variants\n") \
        < text.index("### Every learning rate")
    assert (tmp_path / "out" / "seeds.txt").read_text().startswith("baseline 3\n")
    assert tmp_path / "out" / "seeds.txt" in report.files
    logged = {a.path for a in MlflowClient(store).list_artifacts(parent, "report")}
    assert "report/seeds.txt" in logged


def test_a_metric_series_keeps_one_point_a_step_the_later_logged():
    """The periodic probe and the end-of-run analysis both log the last step: the series
    (the sink table, the ladder plot, the criterion's premise) keeps the later one."""
    from types import SimpleNamespace

    from lab.reports.rows import metric_series

    logged = [SimpleNamespace(step=1000, value=0.02, timestamp=5),
              SimpleNamespace(step=500, value=0.01, timestamp=1),
              SimpleNamespace(step=1000, value=0.03, timestamp=9)]
    client = SimpleNamespace(get_metric_history=lambda run_id, metric: list(logged))
    assert metric_series(client, "r", "sink/first_token_attn") == [(500, 0.01), (1000, 0.03)]


def test_a_run_from_before_the_after_warmup_norm_gets_it_from_its_history(store):
    """Runs before 2026-12-06 logged only the whole run's largest gradient norm (the
    initialisation's); the report takes the one after warmup from loss_history.json and the
    warmup the run's parameters set, and keeps a logged one."""
    from mlflow.tracking import MlflowClient

    from lab.reports.grid_report import run_metrics

    client = MlflowClient(store)
    experiment = client.create_experiment("old")
    norms = [4.7, 3.0, 0.9, 0.4, 1.6, 0.5, 0.3, 0.3]

    def run(metrics: dict):
        run_id = client.create_run(experiment).info.run_id
        # 8 steps of 2 x 4 tokens, a quarter of them warmup: steps 1-2
        for key, value in {"train.tokens": "64.0", "train.batch_size": "2",
                           "model.context": "4", "train.warmup_fraction": "0.25"}.items():
            client.log_param(run_id, key, value)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.log_dict(run_id, {"step": list(range(1, 9)), "loss": [5.0] * 8,
                                 "grad_norm": norms}, "loss_history.json")
        return client.get_run(run_id)

    old = run_metrics(client, run({"train/grad_norm_max": 4.7}))
    assert old["train/grad_norm_max"] == 4.7
    assert old["train/grad_norm_max_after_warmup"] == 1.6
    logged = run({"train/grad_norm_max": 4.7, "train/grad_norm_max_after_warmup": 1.25})
    assert run_metrics(client, logged)["train/grad_norm_max_after_warmup"] == 1.25
