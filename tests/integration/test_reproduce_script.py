"""docs/reproduce_gpu.sh: which grids a phase list runs, in which order, and its bad input.

The script drives the GPU reproduction call by call (docs/results.md); here `python3` and
`nvidia-smi` are stand-ins that record what they were asked, so the test checks the script's
own logic (phase selection, order, the early error) without training anything.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "reproduce_gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# A python3 that logs its arguments, for `store pack PATH` writes PATH (the script reads
# the packed file's size), and with FAKE_COMPILE set a grid writes that file into Inductor's
# cache folder, as a cell's compile does.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [ "$1 $2 $3 $4" = "-m lab store pack" ]; then echo packed > "$5"; fi
if [ "$1 $2 $3" = "-m lab grid" ] && [ -n "${FAKE_COMPILE:-}" ]; then
  mkdir -p "$(dirname "$TORCHINDUCTOR_CACHE_DIR/$FAKE_COMPILE")"
  echo compiled > "$TORCHINDUCTOR_CACHE_DIR/$FAKE_COMPILE"
fi
if [ "$1" = "-c" ]; then echo abc1234; fi
exit 0
"""


def run_script(tmp_path: Path, phases: str, **extra_env: str
               ) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho fake-gpu\n")
    for tool in ("python3", "nvidia-smi"):
        (bin_dir / tool).chmod(0o755)
    calls = tmp_path / "calls.log"
    # (the lab's cache and the carried folder in tmp_path too: the script runs in the
    # checkout, whose .compile-cache/checks.tar.gz it would otherwise unpack into its cache/)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls),
               OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
               GATELAB_STORE=str(tmp_path / "store"), DATA=str(tmp_path / "data"),
               CALL_LIMIT_S="0", GATELAB_CACHE=str(tmp_path / "cache"),
               COMPILE_CACHE_DIR=str(tmp_path / "carried"))
    env.update(extra_env)
    done = subprocess.run(["bash", str(SCRIPT), phases], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done, lines


def grids_run(lines: list[str]) -> list[str]:
    return [Path(line.split()[3]).stem for line in lines if line.startswith("-m lab grid ")]


def test_comma_joined_phases_run_their_grids_in_the_script_s_order(tmp_path):
    done, lines = run_script(tmp_path, "base-lr,base")
    assert done.returncode == 0, done.stdout + done.stderr
    assert grids_run(lines) == ["reproduce-base", "reproduce-base-lr"]
    # the corpus is prepared first, the committed snapshots unpacked into one store before
    # any grid, and each grid that ran packed into its own file last
    assert lines[0].startswith("-m lab prepare")
    committed = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "docs" / "store").glob("*.tar.xz"))
    unpacks = [line.split()[4:] for line in lines if line.startswith("-m lab store unpack")]
    assert unpacks == [committed + ["--quiet"]] and len(committed) >= 4
    out = tmp_path / "out"
    assert lines[-2:] == [f"-m lab store pack {out}/{grid}.tar.xz --grid {grid} --plots --force "
                          "--quiet" for grid in ("reproduce-base", "reproduce-base-lr")]
    assert lines.index(next(line for line in lines if "store unpack" in line)) < \
        lines.index(next(line for line in lines if line.startswith("-m lab grid")))


def test_a_single_phase_runs_only_its_grid(tmp_path):
    done, lines = run_script(tmp_path, "stability-noqk")
    assert done.returncode == 0, done.stdout + done.stderr
    assert grids_run(lines) == ["stability-noqk"]


def test_the_graphs_check_runs_when_named_and_not_in_all(tmp_path):
    """stability-graphs-check (one ladder cell without CUDA graphs) is a named phase only."""
    done, lines = run_script(tmp_path, "stability,stability-graphs-check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert grids_run(lines) == ["stability", "stability-graphs-check"]


ALL_GRIDS = ["reproduce", "reproduce-base", "reproduce-base-init", "reproduce-base-lr",
             "reproduce-base-steps", "sink", "sink-long", "stability", "stability-noqk",
             "reproduce-init", "reproduce-lr"]


def test_all_runs_every_grid_but_not_the_eval_check(tmp_path):
    done, lines = run_script(tmp_path, "all", OUT_FILES_LIMIT="0")  # no limit on files back
    assert done.returncode == 0, done.stdout + done.stderr
    assert grids_run(lines) == ALL_GRIDS  # (not the named-only stability-graphs-check)
    assert not any("eval_check" in line for line in lines)
    packed = [line.split()[6] for line in lines if line.startswith("-m lab store pack")]
    assert packed == ALL_GRIDS


def test_a_call_starts_no_grid_whose_snapshot_would_not_come_back(tmp_path):
    """A lent machine's call brings back 8 files: the log, the reports' tarball and one
    snapshot per grid leave room for 6 grids; the rest wait for the next call."""
    done, lines = run_script(tmp_path, "all")
    assert done.returncode == 0, done.stdout + done.stderr
    assert grids_run(lines) == ALL_GRIDS[:6]
    assert "grid reproduce-init: not started: its snapshot would pass the 8 files" in done.stdout
    out = [line.split()[4] for line in lines if line.startswith("-m lab store pack")]
    assert len(out) == 6 and len(set(out)) == 6


def test_prepare_alone_stops_before_the_store(tmp_path):
    done, lines = run_script(tmp_path, "prepare")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split()[2] for line in lines] == ["prepare"]


def test_an_unknown_phase_is_a_one_line_error_before_anything_runs(tmp_path):
    done, lines = run_script(tmp_path, "base,bsae")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown phase(s): bsae"
    assert lines == []
    assert not (tmp_path / "out").exists()


def test_report_reads_the_base_grid_against_its_init_control(tmp_path):
    done, lines = run_script(tmp_path, "report")
    assert done.returncode == 0, done.stdout + done.stderr
    reports = [line.split()[3:] for line in lines if line.startswith("-m lab report ")]
    # each grid by its file, so that the report checks the file's criterion (docs/grid.md)
    assert [r[0] for r in reports] == [f"ablations/{grid}.yaml" for grid in ALL_GRIDS]
    assert all((ROOT / r[0]).is_file() for r in reports)
    assert reports[1][1:3] == ["--control", "reproduce-base-init"]
    assert "--control" not in reports[0] and "--control" not in reports[2]
    assert not any(line.startswith("-m lab prepare") for line in lines)
    assert not any(line.startswith("-m lab store pack") for line in lines)  # no grid ran
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["reports.tgz",
                                                                     "reproduce.log"]


def test_a_compile_cache_carried_for_this_gpu_is_unpacked_and_packed_back_when_asked(tmp_path):
    """A call finds .compile-cache/inductor-<gpu>.tar.gz (here the stand-in nvidia-smi's
    `fake-gpu`) and unpacks it into Inductor's cache folder before any grid; with
    PACK_COMPILE_CACHE=1 it brings back what the machine compiled since as
    $OUT/inductor-<gpu>.<phases>-<minute>.tar.gz, one of the files a call brings back (the
    carried file travels again as it is); a machine that unpacked nothing brings back its
    whole cache as $OUT/inductor-<gpu>.tar.gz; a cache named for another GPU is left alone."""
    import tarfile

    carried, inductor = tmp_path / "carried", tmp_path / "inductor"
    carried.mkdir()
    source = tmp_path / "made"
    (source / "fxgraph").mkdir(parents=True)
    (source / "fxgraph" / "entry").write_text("graph")
    with tarfile.open(carried / "inductor-fake-gpu.tar.gz", "w:gz") as tar:
        tar.add(source / "fxgraph", arcname="fxgraph")
    done, lines = run_script(tmp_path, "sink", COMPILE_CACHE_DIR=str(carried),
                             TORCHINDUCTOR_CACHE_DIR=str(inductor), PACK_COMPILE_CACHE="1",
                             FAKE_COMPILE="triton/new-kernel")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (inductor / "fxgraph" / "entry").read_text() == "graph"
    assert "compile cache: unpacked" in done.stdout
    unpacked_at = done.stdout.index("compile cache: unpacked")
    assert unpacked_at < done.stdout.index("grid ablations/sink.yaml")
    [new] = (tmp_path / "out").glob("inductor-fake-gpu.*.tar.gz")
    assert re.fullmatch(r"inductor-fake-gpu\.sink-\d{12}\.tar\.gz", new.name)
    with tarfile.open(new) as tar:
        assert tar.getnames() == ["./triton/new-kernel"]  # not the carried entry
    assert not (tmp_path / "out" / "inductor-fake-gpu.tar.gz").exists()

    # the next session carries both files: both are unpacked; nothing compiled, nothing back
    shutil.copy(new, carried / new.name)
    shutil.rmtree(inductor)
    shutil.rmtree(tmp_path / "out")
    done, _ = run_script(tmp_path, "sink", COMPILE_CACHE_DIR=str(carried),
                         TORCHINDUCTOR_CACHE_DIR=str(inductor), PACK_COMPILE_CACHE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (inductor / "triton" / "new-kernel").is_file() and (inductor / "fxgraph").is_dir()
    assert "compile cache: nothing compiled since the carried cache was unpacked" in done.stdout
    assert not list((tmp_path / "out").glob("inductor-*"))
    (carried / new.name).unlink()

    # a machine that unpacked nothing (its own cache there) brings the whole folder back
    Path(f"{inductor}.unpacked").unlink()
    shutil.rmtree(tmp_path / "out")
    done, _ = run_script(tmp_path, "sink", COMPILE_CACHE_DIR=str(carried),
                         TORCHINDUCTOR_CACHE_DIR=str(inductor), PACK_COMPILE_CACHE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    back = tmp_path / "out" / "inductor-fake-gpu.tar.gz"
    with tarfile.open(back) as tar:
        assert {"./fxgraph/entry", "./triton/new-kernel"} <= set(tar.getnames())

    # over the size a call brings back: left out, with the sizes a smaller cache would need
    shutil.rmtree(tmp_path / "out")
    done, _ = run_script(tmp_path, "sink", COMPILE_CACHE_DIR=str(carried),
                         TORCHINDUCTOR_CACHE_DIR=str(inductor), PACK_COMPILE_CACHE="1",
                         OUT_FILE_LIMIT_BYTES="10")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not back.exists()
    assert re.search(r"compile cache: \S+ is \d+ MB, \d+ bytes packed, over 10; not brought back",
                     done.stdout)

    # another GPU's cache: not unpacked; without PACK_COMPILE_CACHE nothing comes back
    (carried / "inductor-fake-gpu.tar.gz").rename(carried / "inductor-other-gpu.tar.gz")
    shutil.rmtree(inductor)
    shutil.rmtree(tmp_path / "out")
    done, _ = run_script(tmp_path, "sink", COMPILE_CACHE_DIR=str(carried),
                         TORCHINDUCTOR_CACHE_DIR=str(inductor))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not inductor.exists() and "compile cache" not in done.stdout
    assert not (tmp_path / "out" / "inductor-fake-gpu.tar.gz").exists()

    # asked to bring back a cache where no grid compiled into the folder: a line says so
    shutil.rmtree(tmp_path / "out")
    done, _ = run_script(tmp_path, "sink", COMPILE_CACHE_DIR=str(carried),
                         TORCHINDUCTOR_CACHE_DIR=str(inductor), PACK_COMPILE_CACHE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"compile cache: nothing brought back: no folder {inductor}" in done.stdout
    assert f"compile cache: nothing brought back: no folder {inductor}\n" in done.stdout  # (not
    # followed by the GPU's name)


def test_the_checks_passes_travel_between_sessions_with_the_grids(tmp_path):
    """A call unpacks .compile-cache/checks.tar.gz (the numerics check's passes, lab/check.py)
    into the lab's cache before any grid, keeping a pass this machine already holds, and a
    call that ran a grid brings the passes back as $OUT/checks.tar.gz."""
    import tarfile

    carried, cache = tmp_path / "carried", tmp_path / "cache"
    carried.mkdir()
    made = tmp_path / "made"
    made.mkdir()
    (made / "baseline-abc.txt").write_text("carried pass")
    (made / "kept-def.txt").write_text("carried copy")
    with tarfile.open(carried / "checks.tar.gz", "w:gz") as tar:
        for path in made.iterdir():
            tar.add(path, arcname=path.name)
    (cache / "checks").mkdir(parents=True)
    (cache / "checks" / "kept-def.txt").write_text("this machine's pass")
    done, _ = run_script(tmp_path, "sink", COMPILE_CACHE_DIR=str(carried),
                         GATELAB_CACHE=str(cache))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (cache / "checks" / "baseline-abc.txt").read_text() == "carried pass"
    assert (cache / "checks" / "kept-def.txt").read_text() == "this machine's pass"
    assert done.stdout.index("checks: unpacked") < done.stdout.index("grid ablations/sink.yaml")
    with tarfile.open(tmp_path / "out" / "checks.tar.gz") as tar:
        assert sorted(tar.getnames()) == [".", "./baseline-abc.txt", "./kept-def.txt"]

    # a call that runs no grid brings no passes back
    shutil.rmtree(tmp_path / "out")
    done, _ = run_script(tmp_path, "report", COMPILE_CACHE_DIR=str(carried),
                         GATELAB_CACHE=str(cache))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "out" / "checks.tar.gz").exists()


def test_an_empty_checks_folder_is_not_packed(tmp_path):
    """A checks folder without a pass (a carried file that held none) takes no file."""
    (tmp_path / "cache" / "checks").mkdir(parents=True)
    done, _ = run_script(tmp_path, "sink", COMPILE_CACHE_DIR=str(tmp_path / "carried"),
                         GATELAB_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "out" / "checks.tar.gz").exists()
    assert "checks: packed" not in done.stdout
