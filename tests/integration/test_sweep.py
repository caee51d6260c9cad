"""lab/experiments/sweep/: sweep files, the analysis, step-based pruning, parallel workers on one
Optuna storage (journal file and PostgreSQL), MLflow nesting, and best_lrs beside the report
of a sweep that really ran (the report's own tests: tests/unit/test_sweep_report.py)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.artifacts import FileSystemArtifactStore

from lab.cli import main
from lab.errors import LabError
from lab.experiments.sweep.results import best_lrs, summarize_trials
from lab.experiments.sweep.run import run_sweep
from lab.experiments.sweep.spec import load_sweep, parse_sweep
from lab.experiments.sweep.studies import open_study
from lab.experiments.sweep.trials import run_trial, trial_tasks
from lab.reports.sweep_report import sweep_report
from sweepkit import made_up_trial

TINY = dict(name="t", preset="tiny", data="synthetic", tokens=2.5e4,
            variants=["baseline", "sdpa_elementwise_sigmoid_mul"],
            lr={"ladder": [3e-3, 3e-2, 1.0, 30.0]}, overrides={"train.val_every": 4})


def sweep_dict(**changes) -> dict:
    raw = dict(TINY)
    raw.update(changes)
    return raw


@pytest.fixture(scope="module")
def workspace(new_store):
    """A working directory with its own MLflow store and sweeps/, and the shared data cache
    (workers are spawned processes: they inherit the environment and the working directory)."""
    store = new_store("sweep")
    root = store.root.parent
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for key, value in store.env.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root


# --- the sweep file -------------------------------------------------------------------

def test_shipped_sweep_file_is_valid():
    sweep = load_sweep(Path(__file__).parents[2] / "sweeps" / "lr.yaml")
    assert sweep.name == "lr" and sweep.sampler == "tpe" and sweep.pruner == "median"
    assert len(sweep.variants) >= 2 and sweep.lr_low < sweep.lr_high


def test_ladder_defaults_to_grid_over_lr_and_seed():
    sweep = parse_sweep(sweep_dict(seeds=[0, 1]))
    assert sweep.sampler == "grid" and sweep.trials == 8
    assert sweep.grid() == {"lr": [3e-3, 3e-2, 1.0, 30.0], "seed": [0, 1]}
    assert sweep.tokens == 2.5e4
    assert parse_sweep(sweep_dict(tokens="2e5")).tokens == 2e5  # YAML 1.1 reads 2e5 as text


@pytest.mark.parametrize("changes, field", [
    (dict(preset="huge"), "preset"),
    (dict(variants=["baseline", "nope"]), "variant"),
    (dict(variants=[]), "variants"),
    (dict(lr={"low": 1e-2, "high": 1e-3}), "lr"),
    (dict(lr={"low": -1, "high": 1e-3}), "lr.low"),
    (dict(lr={"ladder": []}), "lr.ladder"),
    (dict(lr={"ladder": [1e-3], "low": 1e-4}), "lr"),
    (dict(lr={"low": 1e-3, "high": 1e-2}, sampler="grid"), "sampler"),
    (dict(sampler="gp"), "sampler"),  # a ladder is the grid's
    (dict(sampler="cmaes"), "sampler"),
    (dict(pruner="hyperband"), "pruner"),
    (dict(pruner={"kind": "median", "patience": 3}), "pruner"),
    (dict(trials=0), "trials"),
    (dict(seeds=[-1]), "seeds"),
    (dict(tokens=0), "tokens"),
    (dict(overrides={"train.lr": 1e-3}), "overrides"),
    (dict(overrides={"train.nope": 1}), "train.nope"),
    (dict(overrides={"model.n_kv_heads": 3}), "model.n_heads"),
    (dict(name="a/b"), "name"),
    (dict(colour="red"), "colour"),
])
def test_bad_sweep_fields_name_the_field(changes, field):
    with pytest.raises(LabError, match=field.replace(".", r"\.")):
        parse_sweep(sweep_dict(**changes))


def test_an_unknown_sampler_is_one_line_naming_the_allowed_ones():
    with pytest.raises(LabError) as err:
        parse_sweep(sweep_dict(lr={"low": 1e-3, "high": 1e-2}, sampler="bayes"))
    assert "\n" not in str(err.value)
    assert all(name in str(err.value) for name in ("sampler", "bayes", "tpe", "random", "gp"))


def test_the_gp_sampler_searches_a_one_dimensional_lr_range():
    """sampler: gp is Optuna's GPSampler: after its random start it proposes from the
    Gaussian process, inside the range, and closes in on the minimum of a smooth curve."""
    sweep = parse_sweep(sweep_dict(lr={"low": 1e-4, "high": 1.0}, sampler="gp", trials=12))
    study = open_study(sweep, "baseline", storage=None, sampler_seed=0)  # in memory
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    best_lr = 1e-2  # the made-up loss is a parabola in log10(lr) with its minimum here
    study.optimize(lambda trial: (math.log10(trial.suggest_float("lr", 1e-4, 1.0, log=True))
                                  - math.log10(best_lr)) ** 2, n_trials=sweep.trials)
    assert all(1e-4 <= t.params["lr"] <= 1.0 for t in study.trials)
    assert abs(math.log10(study.best_params["lr"]) - math.log10(best_lr)) < 0.2


def test_cli_rejects_bad_input_with_exit_2_before_anything_is_created(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    (tmp_path / "broken.yaml").write_text("name: x\nvariants: [baseline\n")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(sweep_dict(pruner="hyperband")))
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(sweep_dict()))
    for argv in (["sweep", "broken.yaml"], ["sweep", "bad.yaml"], ["sweep", "missing.yaml"],
                 ["sweep", "good.yaml", "--variants", "baseline,nope"],
                 ["sweep", "good.yaml", "--n-trials", "0"], ["sweep", "good.yaml", "--workers", "0"],
                 ["sweep-report", "never-ran"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlruns").exists()


def test_preset_data_tokens_and_set_replace_the_files_values_as_for_a_grid(tmp_path, monkeypatch):
    """`gatelab sweep` and `gatelab grid` take the same flags through the same code, with the
    same meaning: --preset, --data and --tokens replace the file's values, --set adds an
    override; the sweep is validated again with them before anything runs."""
    from lab.experiments.grid import run as grid_module
    from lab.experiments.sweep import run as sweep_module

    seen = {}
    monkeypatch.setattr(sweep_module, "run_sweep",
                        lambda spec, **options: seen.setdefault("sweep", spec) and {})
    monkeypatch.setattr(grid_module, "run_grid", lambda spec, options: seen.setdefault(
        "grid", spec) and grid_module.GridSummary(spec.name, 0, 0, []))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep_dict(variants=["baseline"])))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(
        {"name": "g", "variants": ["baseline"], "tokens": 2.5e4,
         "overrides": {"train.val_every": 4}}))
    flags = ["--preset", "small", "--data", str(tmp_path / "corpus"), "--tokens", "1e6",
             "--set", "train.log_every=5", "--quiet"]
    assert main(["sweep", str(tmp_path / "sweep.yaml"), *flags]) == 0
    assert main(["grid", str(tmp_path / "grid.yaml"), *flags]) == 0
    for spec in seen.values():
        assert (spec.preset, spec.data, spec.tokens) == ("small", str(tmp_path / "corpus"), 1e6)
        assert spec.overrides == {"train.val_every": 4, "train.log_every": "5"}
    config = seen["sweep"].config("baseline", 1e-3, 0)
    assert config.preset == "small" and config.train.tokens == 1e6
    assert config.train.log_every == 5 and config.data.source == str(tmp_path / "corpus")
    with pytest.raises(LabError, match="preset: unknown preset 'huge'"):
        seen["sweep"].with_flags(preset="huge")


# --- the analysis ---------------------------------------------------------------------

def test_summary_best_and_max_stable_lr():
    trials = [made_up_trial(1e-3, 3.00), made_up_trial(1e-3, 3.02), made_up_trial(3e-3, 2.90),
              made_up_trial(1e-2, 2.95), made_up_trial(3e-2, 2.97),
              made_up_trial(3e-2, state="diverged"), made_up_trial(1e-1, 3.5),
              made_up_trial(3e-1, state="diverged"), made_up_trial(5e-3, state="pruned")]
    s = summarize_trials(trials)
    assert s.best_lr == 3e-3 and s.best_loss == pytest.approx(2.90)
    # 1e-2 is within 2% of 2.90; 3e-2 would be too, but one of its seeds diverged.
    assert s.max_stable_lr == 1e-2
    assert s.counts == {"complete": 6, "pruned": 1, "diverged": 2, "failed": 0}
    assert [p.lr for p in s.points] == sorted(p.lr for p in s.points)
    assert next(p for p in s.points if p.lr == 1e-3).mean_loss == pytest.approx(3.01)


def test_diverged_trials_are_never_best():
    s = summarize_trials([made_up_trial(1.0, state="diverged"),
                          made_up_trial(10.0, state="diverged")])
    assert s.best_lr is None and s.max_stable_lr is None and s.counts["diverged"] == 2


def test_each_study_gets_exactly_its_budget_of_trials():
    """The trials still to run become one task each, study after study, whichever worker
    takes which (the split of 7 trials over 3 workers that this replaced: [3, 2, 2])."""
    tasks = trial_tasks({"baseline": 7, "gated": 0, "other": 2})
    assert [t.variant for t in tasks] == ["baseline"] * 7 + ["other"] * 2
    assert [t.index for t in tasks] == list(range(9))
    assert trial_tasks({"baseline": 0}) == []


# --- pruning by step --------------------------------------------------------------------

@pytest.mark.slow
def test_pruned_trial_reports_by_step_and_ends_pruned_not_failed(workspace):
    from lab import records

    sweep = parse_sweep(sweep_dict(name="prune", variants=["baseline"],
                                   lr={"low": 1e-3, "high": 1e-2}, sampler="random"))
    # A loss above 0 always crosses this threshold: the first validation (step 4) prunes.
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    uri = records.tracking_uri()
    seen = []
    study.optimize(lambda t: run_trial(t, sweep, "baseline", uri, parent_run_id=None,
                                       notify=seen.append), n_trials=1)
    trial = study.trials[0]
    # What a pool worker tells its parent (which trial, then which run) as it happens.
    assert seen == [{"trial": 0}, {"run_id": trial.user_attrs["mlflow_run_id"]}]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [4]          # keyed by training step
    assert trial.user_attrs["state"] == "pruned" and trial.user_attrs["pruned_step"] == 4
    run = records.client(uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["state"] == "pruned"
    assert run.data.tags["trial"] == "0"


def test_a_pruned_trials_loss_curve_is_an_optuna_artifact_ending_where_it_stopped(
        workspace, tmp_path):
    from lab import records

    sweep = parse_sweep(sweep_dict(name="curve", variants=["baseline"],
                                   lr={"low": 1e-3, "high": 1e-2}, sampler="random",
                                   overrides={"train.val_every": 4, "train.log_every": 1}))
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    store = FileSystemArtifactStore(tmp_path)
    uri = records.tracking_uri()
    study.optimize(lambda t: run_trial(t, sweep, "baseline", uri, parent_run_id=None,
                                       artifacts=store), n_trials=1)
    trial = study.trials[0]
    rows = loss_curve(trial, study, store)
    run_id = trial.user_attrs["mlflow_run_id"]
    for name in ("train/loss", "val/loss"):
        history = records.client(uri).get_metric_history(run_id, name)
        assert history  # the run logged some, and the curve holds exactly those
        assert {int(r["step"]): float(r[name]) for r in rows if r[name]} == pytest.approx(
            {m.step: m.value for m in history}, rel=1e-5)
    # pruned at its first validation (step 4): the curve stops there
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def loss_curve(trial, study, store) -> list[dict]:
    """The trial's one artifact, loss_curve.csv, read back through Optuna."""
    (meta,) = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
    assert meta.filename == "loss_curve.csv" and meta.mimetype == "text/csv"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / meta.filename
        optuna.artifacts.download_artifact(artifact_store=store, file_path=str(path),
                                           artifact_id=meta.artifact_id)
        with path.open() as handle:
            return list(csv.DictReader(handle))


# --- parallel workers, MLflow nesting, the report ---------------------------------------

@pytest.fixture(scope="module")
def finished_sweep(workspace):
    """The acceptance sweep: 2 variants x 4 LRs on tiny, here with 4 worker processes on the
    default journal storage (LR 30 diverges for both variants)."""
    sweep = parse_sweep(sweep_dict(pruner="none"))
    started = time.time()
    summaries = run_sweep(sweep, workers=4, quiet=True)
    return sweep, summaries, time.time() - started


@pytest.mark.slow
def test_four_workers_record_every_trial_once(finished_sweep, workspace):
    sweep, summaries, _ = finished_sweep
    storage = optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workspace / "sweeps" / "t.journal")))
    workers = set()
    for variant in sweep.variants:
        trials = optuna.load_study(study_name=f"t/{variant}", storage=storage).trials
        assert [t.number for t in trials] == [0, 1, 2, 3]
        assert sorted(t.params["lr"] for t in trials) == [3e-3, 3e-2, 1.0, 30.0]
        assert all(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL
                   for t in trials)
        by_lr = {t.params["lr"]: t for t in trials}
        assert by_lr[30.0].state == optuna.trial.TrialState.PRUNED
        assert by_lr[30.0].user_attrs["state"] == "diverged"
        assert by_lr[3e-3].user_attrs["state"] == "complete"
        workers |= {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 4  # four processes did the work
    # Each trial's loss curve, beside the journal: to its last step, or its divergence.
    store = FileSystemArtifactStore(workspace / "sweeps" / "t.artifacts")
    for variant in sweep.variants:
        study = optuna.load_study(study_name=f"t/{variant}", storage=storage)
        for trial in study.trials:
            rows = loss_curve(trial, study, store)
            steps = [int(r["step"]) for r in rows if r["train/loss"]]
            assert steps and steps == sorted(steps)
            if trial.user_attrs["state"] == "complete":
                assert sweep.steps() - steps[-1] < 5  # logged every 5 steps (train.log_every)
            else:
                assert steps[-1] <= trial.user_attrs["diverged_step"]
    for summary in summaries.values():
        assert summary.best_lr in (3e-3, 3e-2, 1.0) and summary.best_lr != 30.0
        assert summary.counts["diverged"] >= 1


@pytest.mark.slow
def test_two_workers_on_two_gpus_each_get_their_own(workspace, monkeypatch):
    """The sweep's workers used to start with no CUDA_VISIBLE_DEVICES, so on a 2-GPU machine
    every trial trained on GPU 0. With two GPUs (their count stood in for: no CUDA here) each
    of two workers is pinned to its own, a third shares one, and the cores are split."""
    from lab.experiments.sweep import run as sweep_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    started = []

    class RecordingPool:
        def __init__(self, slots, threads, ctx, studies):
            started.append(([slot.get("CUDA_VISIBLE_DEVICES") for slot in slots], threads))

        def run(self, tasks, on_outcome, on_dispatch):
            pass

        def close(self, signum=None):
            pass

    monkeypatch.setattr(sweep_module, "TrialPool", RecordingPool)
    sweep = parse_sweep(sweep_dict(name="pinned", variants=["baseline"],
                                   lr={"ladder": [1e-3, 3e-3, 1e-2]}, pruner="none"))
    run_sweep(sweep, workers=2, quiet=True, check=False)
    run_sweep(sweep, workers=3, quiet=True, check=False)
    assert started == [(["0", "1"], 6), (["0", "0", "1"], 4)]
    # On the CPU a model as narrow as tiny's (d_model 64) trains on one thread per worker,
    # as the grid's cells do (lab/experiments/pool.py threads_per_worker), not on 12 // 2.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    run_sweep(parse_sweep(sweep_dict(name="cpu-pinned", variants=["baseline"],
                                     lr={"ladder": [1e-3, 3e-3]}, pruner="none")),
              workers=2, quiet=True, check=False)
    assert started[-1] == ([None, None], 1)


def test_the_workers_compile_into_the_labs_cache_not_torchs_temporary_one(tmp_path, monkeypatch):
    """The sweep's process has imported Lightning, which set TORCHINDUCTOR_CACHE_DIR to
    torch's temporary default; its workers inherit that environment and cannot tell who set
    the variable (lab/__init__.py INDUCTOR_CACHE_GIVEN: True in every worker), so they kept
    torch's folder and a GPU sweep's compiles never reached the lab's cache. The lab's folder
    is set before the workers start, as a grid sets it."""
    from types import SimpleNamespace

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    import lab
    from lab.experiments.sweep import run as sweep_module
    from lab.training import step

    monkeypatch.setattr(lab, "INDUCTOR_CACHE_GIVEN", False)
    monkeypatch.setenv(step.COMPILE_CACHE_ENV, default_cache_dir())
    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    inherited = []

    class RecordingPool:
        def __init__(self, slots, threads, ctx, studies):
            inherited.append(os.environ[step.COMPILE_CACHE_ENV])

        def run(self, tasks, on_outcome, on_dispatch):
            pass

        def close(self, signum=None):
            pass

    monkeypatch.setattr(sweep_module, "TrialPool", RecordingPool)
    sweep_module._run_trials(["a trial", "another"], SimpleNamespace(sweep=None), 2, ["0"], {})
    assert inherited == [str(tmp_path / "cache" / "inductor")]


def test_a_trial_whose_worker_died_fails_and_its_run_says_why(tmp_path, monkeypatch):
    """What the sweep's pool does when a worker dies holding a trial (the pool's own test,
    tests/integration/test_pool.py, kills one): the trial is told FAIL, on a study whose sampler is not
    the ladder's GridSampler (telling its last point would stop an optimize loop that is not
    running), and the run, found by its tags here, ends FAILED saying why."""
    from types import SimpleNamespace

    from lab import records
    from lab.experiments.sweep.storage import open_storage
    from lab.experiments.sweep.trials import SweepContext, TrialPool, TrialTask

    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    uri = records.tracking_uri()
    client = records.client(uri)
    experiment = client.create_experiment("crashed")
    sweep = parse_sweep(sweep_dict(name="crashed", variants=["baseline"], lr={"ladder": [1e-3]},
                                   pruner="none"))
    storage = open_storage(str(tmp_path / "c.journal"))
    trial = open_study(sweep, "baseline", storage).ask()  # as the worker's GridSampler had it
    trial.suggest_float("lr", 1e-3, 1e-3, log=True)
    run = client.create_run(experiment, tags={"study": "crashed/baseline", "trial": "0"})
    bookkeeping = open_study(sweep, "baseline", storage, sampler=optuna.samplers.RandomSampler())
    parent = SimpleNamespace(context=SweepContext(sweep, str(tmp_path / "c.journal"), uri, {}),
                             studies={"baseline": bookkeeping})
    reason = "worker process was killed by SIGKILL (exit code -9) while training"
    TrialPool.crashed(parent, TrialTask(0, "baseline"), {"trial": 0}, reason)
    assert [t.state.name for t in bookkeeping.get_trials()] == ["FAIL"]
    record = client.get_run(run.info.run_id)
    assert record.info.status == "FAILED" and record.data.tags["state"] == "failed"
    assert record.data.tags["gatelab.failure_kind"] == "worker_died"
    assert record.data.tags["gatelab.failure"] == reason


@pytest.mark.slow
def test_mlflow_one_child_per_trial_nested_under_its_study(finished_sweep, workspace):
    from lab import records

    client = records.client(records.tracking_uri())
    experiment = client.get_experiment_by_name("t").experiment_id
    runs = client.search_runs([experiment])
    parents = {r.data.tags["study"]: r.info.run_id for r in runs
               if r.data.tags.get("sweep_role") == "parent"}
    children = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    assert set(parents) == {"t/baseline", "t/sdpa_elementwise_sigmoid_mul"}
    assert len(children) == 8
    assert len({(r.data.tags["study"], r.data.tags["trial"]) for r in children}) == 8
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[run.data.tags["study"]]
        assert run.data.tags["state"] in ("complete", "diverged")
        if run.data.tags["lr"] == "30":
            assert run.data.tags["state"] == "diverged" and run.data.tags["diverged"] == "true"
    nested = client.search_runs([experiment], filter_string=(
        f"tags.mlflow.parentRunId = '{parents['t/baseline']}'"))
    assert len(nested) == 4


@pytest.mark.slow
def test_resumed_sweep_adds_nothing_and_reuses_parents(finished_sweep, workspace):
    from lab import records

    sweep, _, _ = finished_sweep
    run_sweep(sweep, workers=2, quiet=True)
    client = records.client(records.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 10  # 2 parents + 8 children, as before


@pytest.mark.slow
def test_report_and_best_lrs(finished_sweep, workspace, capsys):
    from lab import records

    assert main(["sweep-report", "t"]) == 0
    out = capsys.readouterr().out
    for variant in TINY["variants"]:
        assert f"{variant}: best lr " in out and "max stable lr" in out
    assert "1 diverged" in out
    report = workspace / "reports" / "sweeps" / "t"
    assert (report / "val_loss_vs_lr.png").stat().st_size > 10_000
    lrs = best_lrs("t")
    summaries, _ = sweep_report("t", out=workspace / "again")
    assert lrs == {v: s.best_lr for v, s in summaries.items()} and set(lrs) == set(TINY["variants"])
    client = records.client(records.tracking_uri())
    parent = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                                filter_string="tags.sweep_role = 'parent'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep_report")}
    assert "sweep_report/val_loss_vs_lr.png" in logged
    assert parent.data.metrics["best/lr"] == lrs[parent.data.tags["variant"]]


# --- PostgreSQL: workers on several machines ------------------------------------------

def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _install_postgres() -> str | None:
    """Debian's postgresql package, once per session; the reason it failed, else None."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL is not installed and apt-get (as root) is unavailable"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=60,
                       capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
                       env=env, check=True, timeout=90, capture_output=True)
    except (subprocess.SubprocessError, OSError) as err:
        return f"apt-get install postgresql failed or took too long: {str(err)[:200]}"
    return None


@pytest.fixture(scope="session")
def postgres_url():
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install "
                        "'psycopg[binary]==3.3.9', in the dev extra)")
    bindir = _postgres_bin()
    if bindir is None:
        reason = _install_postgres()
        bindir = _postgres_bin()
        if bindir is None:
            pytest.skip(reason or "PostgreSQL binaries not found after install")
    data = Path(tempfile.mkdtemp(prefix="gatelab-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust",
                                 "-U", "postgres"], check=True, capture_output=True, timeout=60)
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data / "db"), "-w", "-t", "30",
                                 "-l", str(data / "log"), "-o",
                                 f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=60)
    except (subprocess.SubprocessError, OSError, LookupError) as err:
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {str(err)[:200]}")
    print(f"PostgreSQL {bindir.parent.name} on 127.0.0.1:{port}")
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate",
                             "stop"], capture_output=True, timeout=60)
    shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_postgres_storage_with_two_workers(postgres_url, workspace):
    sweep = parse_sweep(sweep_dict(name="pg", variants=["baseline"],
                                   lr={"ladder": [3e-3, 30.0]}, pruner="none"))
    summaries = run_sweep(sweep, workers=2, storage=postgres_url, quiet=True)
    study = optuna.load_study(study_name="pg/baseline", storage=postgres_url)
    assert len(study.trials) == 2 and {t.params["lr"] for t in study.trials} == {3e-3, 30.0}
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    assert summaries["baseline"].best_lr == 3e-3
    assert best_lrs("pg", storage=postgres_url) == {"baseline": 3e-3}
    assert not (workspace / "sweeps" / "pg.journal").exists()


@pytest.mark.slow
def test_stale_trials_of_dead_local_workers_fail_and_others_stay(tmp_path):
    from lab.records.owners import owner_identity
    from lab.experiments.sweep.storage import open_storage, storage_url
    from lab.experiments.sweep.studies import fail_stale_trials

    study = optuna.create_study(study_name="s/baseline",
                                storage=open_storage(str(tmp_path / "s.journal")))
    dead = subprocess.Popen(["true"])
    dead.wait()
    for worker in (owner_identity(dead.pid), owner_identity(), f"elsewhere:{dead.pid}:"):
        study.ask().set_user_attr("worker", worker)
    assert fail_stale_trials(study, uri=f"sqlite:///{tmp_path / 'unused.db'}") == 1
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.RUNNING] * 2
    assert storage_url("s", str(tmp_path / "x.journal")) == str(tmp_path / "x.journal")
    assert storage_url("nosuch") == str(Path("sweeps") / "nosuch.journal")


def test_the_journal_lock_points_at_the_journal_for_a_relative_path_too(tmp_path, monkeypatch):
    """Optuna's journal lock is a symlink to the journal; left by a killed process, the next
    writer breaks it after a grace period measured from the journal's mtime, read through
    the link. Made from a relative path (sweeps/<name>.journal, the default) the link
    dangled, the grace never began, and a rerun spun at full CPU for ever (a kill-resume
    test hung on it)."""
    from lab.experiments.sweep.storage import open_storage

    monkeypatch.chdir(tmp_path)
    links = []
    original = os.symlink
    monkeypatch.setattr(os, "symlink", lambda target, link: (links.append((target, link)),
                                                             original(target, link))[1])
    optuna.create_study(study_name="locked", storage=open_storage("sweeps/locked.journal"))
    assert links, "the journal was written without its lock"
    journal = (tmp_path / "sweeps" / "locked.journal").resolve()
    for target, link in links:
        assert (Path(link).parent / target).resolve() == journal


@pytest.mark.slow
def test_a_killed_ladder_trial_runs_again_at_its_point_and_no_point_runs_twice(workspace,
                                                                               monkeypatch):
    """A SIGKILL leaves the trial RUNNING; the rerun marks it FAIL. The GridSampler counts a
    FAIL trial's point as visited, so before retry_failed_trials the rerun ended one point
    short (GridSampler stops the study once every point is visited) and the rerun after it
    trained a random point a second time."""
    from lab.experiments.sweep import run as sweep_module
    from lab.records.owners import owner_identity
    from lab.experiments.sweep.storage import open_storage

    monkeypatch.setattr(sweep_module, "threads_per_worker",
                        lambda workers, d_model=None: 1)  # conftest.py

    sweep = parse_sweep(sweep_dict(name="killed", variants=["baseline"], tokens=2048,
                                   lr={"ladder": [1e-3, 3e-3, 1e-2]}, pruner="none"))
    run_sweep(sweep, n_trials=1, quiet=True)
    study = open_study(sweep, "baseline", open_storage(str(workspace / "sweeps" / "killed.journal")))
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = study.ask()  # trial 1 of a worker killed mid-trial: the GridSampler gave it a point
    killed.set_user_attr("worker", owner_identity(dead.pid))
    killed_lr = killed.suggest_float("lr", 1e-3, 1e-2, log=True)

    run_sweep(sweep, quiet=True)
    trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 3
    assert "RUNNING" not in states and "WAITING" not in states
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["lr"] for t in done) == [1e-3, 3e-3, 1e-2]
    retry = next(t for t in done if "failed_trial" in t.system_attrs)
    assert retry.system_attrs["failed_trial"] == 1 and retry.params["lr"] == killed_lr
    run_sweep(sweep, quiet=True)  # complete: nothing runs again, nothing is queued
    assert len(study.get_trials()) == len(trials)


def test_retry_failed_trials_queues_each_failure_once_within_the_limit():
    from lab.experiments.sweep.studies import retry_failed_trials

    study = optuna.create_study()
    for lr in (1e-3, 1e-2):
        study.tell(study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1)}),
                   state=optuna.trial.TrialState.FAIL)
    assert retry_failed_trials(study, limit=1) == 1     # one waiting now: the limit is reached
    assert retry_failed_trials(study, limit=1) == 0
    assert retry_failed_trials(study, limit=3) == 1     # the other failure, once
    assert retry_failed_trials(study, limit=3) == 0
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == [0, 1]
    assert [t.params for t in waiting] == [study.trials[0].params, study.trials[1].params]


def _store_and_study(tmp_path, monkeypatch, name: str):
    """A fresh MLflow store with the experiment `name`, and the study `name`/baseline on a
    journal beside it: what a sweep's rerun finds. Returns uri, client, experiment id, study."""
    from lab import records
    from lab.experiments.sweep.storage import open_storage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier test's, if left
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    uri = records.tracking_uri()
    client = records.client(uri)
    study = optuna.create_study(study_name=f"{name}/baseline",
                                storage=open_storage(str(tmp_path / f"{name}.journal")))
    return uri, client, client.create_experiment(name), study


class _Killed(BaseException):
    """A SIGKILL of the resuming process, landing right after one of its writes."""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["run ended", "trial told"])
def test_a_rerun_killed_while_failing_a_stale_trial_leaves_no_run_running(tmp_path,
                                                                         monkeypatch,
                                                                         kill_after):
    """fail_stale_trials killed after any one of its writes, then run again (the next
    rerun): the trial ends FAIL and none of its MLflow runs stays RUNNING. When the trial was
    told FAIL before its runs ended, a kill after the tell left a RUNNING run that no rerun
    would look at again (CI's kill-resume test: 2 of 8 runs RUNNING at the end)."""
    from mlflow.tracking import MlflowClient

    from lab.records.owners import owner_identity
    from lab.experiments.sweep.studies import fail_stale_trials

    uri, client, experiment, study = _store_and_study(tmp_path, monkeypatch, "rekilled")
    dead = subprocess.Popen(["true"])
    dead.wait()
    trial = study.ask()
    trial.set_user_attr("worker", owner_identity(dead.pid))
    recorded = client.create_run(experiment, tags={"study": "rekilled/baseline", "trial": "0"})
    trial.set_user_attr("mlflow_run_id", recorded.info.run_id)
    unrecorded = client.create_run(experiment, tags={"study": "rekilled/baseline", "trial": "0"})

    with monkeypatch.context() as patch:
        if kill_after == "run ended":
            original = MlflowClient.set_terminated

            def set_terminated(self, run_id, *args, **kwargs):
                original(self, run_id, *args, **kwargs)
                raise _Killed

            patch.setattr(MlflowClient, "set_terminated", set_terminated)
        else:
            original = study.tell

            def tell(*args, **kwargs):
                original(*args, **kwargs)
                raise _Killed

            patch.setattr(study, "tell", tell)
        with pytest.raises(_Killed):
            fail_stale_trials(study, uri, "rekilled")
    fail_stale_trials(study, uri, "rekilled")  # the next rerun
    assert [t.state.name for t in study.trials] == ["FAIL"]
    for run in (recorded, unrecorded):
        assert client.get_run(run.info.run_id).info.status == "KILLED"


@pytest.mark.slow
def test_a_trial_killed_before_recording_its_worker_fails_after_the_grace(tmp_path, monkeypatch):
    """A kill between the trial's creation and its `worker` attribute, or between the MLflow
    run's creation and the trial's `mlflow_run_id`: the trial fails once it has stayed
    without an owner for the grace, its MLflow run is found by its tags; a trial whose live
    worker records itself within the grace is left to it."""
    import threading

    from lab.experiments.sweep import studies as sweep_module
    from lab.records.owners import owner_identity
    from lab.experiments.sweep.studies import fail_stale_trials

    monkeypatch.setattr(sweep_module, "UNOWNED_TRIAL_GRACE_S", 1.0)
    uri, client, experiment, study = _store_and_study(tmp_path, monkeypatch, "orphans")
    orphan, claimed = study.ask(), study.ask()
    run = client.create_run(experiment, tags={"study": "orphans/baseline", "trial": "0"})
    other = client.create_run(experiment, tags={"study": "orphans/baseline", "trial": "1"})
    late = threading.Timer(0.3, claimed.set_user_attr, ("worker", owner_identity()))
    late.start()
    started = time.monotonic()
    assert fail_stale_trials(study, uri, "orphans") == 1
    assert time.monotonic() - started >= 0.9
    late.join()
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING"]
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert client.get_run(run.info.run_id).data.tags["state"] == "failed"
    assert "was gone" in client.get_run(run.info.run_id).data.tags["gatelab.killed_reason"]
    assert client.get_run(other.info.run_id).info.status == "RUNNING"


def test_sweep_reads_its_lists_and_name_as_a_grid_does():
    sweep = parse_sweep(sweep_dict(seeds="0,1", variants="baseline"))
    assert sweep.seeds == (0, 1) and sweep.variants == ("baseline",)
    for bad, field in ((dict(name="-x"), "name"), (dict(seeds=[0, 0]), "seeds: lists a value twice"),
                       (dict(variants="all"), "variants"),
                       (dict(overrides={"train.tokens": 1e5}), "sweep's `tokens` field")):
        with pytest.raises(LabError, match=field):
            parse_sweep(sweep_dict(**bad))


@pytest.mark.slow
def test_the_gpu_check_table_is_kept_on_each_parent_run(workspace, monkeypatch):
    """On a GPU machine the check's table (lab.check.check_before_training) goes with the
    results it vouched for; here the check is stood in for, as CUDA is absent."""
    from lab import check, records
    from lab.experiments.sweep import run as sweep_module

    monkeypatch.setattr(sweep_module, "threads_per_worker",
                        lambda workers, d_model=None: 1)  # conftest.py
    monkeypatch.setattr(check, "check_before_training",
                        lambda *args, **kwargs: "variant  mode  logits\nbaseline eager 7e-03\n")
    sweep = parse_sweep(sweep_dict(name="checked", variants=["baseline"], tokens=2048,
                                   lr={"ladder": [1e-3]}, pruner="none"))
    run_sweep(sweep, quiet=True)
    client = records.client(records.tracking_uri())
    experiment = client.get_experiment_by_name("checked").experiment_id
    parent = next(r for r in client.search_runs([experiment])
                  if r.data.tags.get("sweep_role") == "parent")
    kept = [a.path for a in client.list_artifacts(parent.info.run_id)
            if a.path.startswith("check-")]
    assert len(kept) == 1 and kept[0].endswith(".txt")
    text = Path(client.download_artifacts(parent.info.run_id, kept[0], str(workspace))).read_text()
    assert "baseline eager 7e-03" in text
