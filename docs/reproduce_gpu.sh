#!/usr/bin/env bash
# The whole GPU reproduction (docs/results.md), phase by phase on one or more GPUs.
#   bash docs/reproduce_gpu.sh [all|prepare|eval-check|reproduce|base|base-init|base-lr|base-steps|sink|sink-long|stability|stability-noqk|stability-graphs-check|init-control|lr-control|report]
# or several phases joined by commas (base,base-init), run in the script's order within one
# call's CALL_LIMIT_S: a phase that ends early leaves its time to the next.
# Phases, so that each fits one call of a time-limited machine; the grids resume from the
# MLflow store, so a phase cut short by its time limit is finished by running it again.
# `all` runs every grid but eval-check and stability-graphs-check, which run when named.
# DATA: the Gutenberg folder (../shared/data/gutenberg-en in a checkout beside shared/, or a
# git-ignored copy at .data/gutenberg-en carried to a machine that cannot see shared/).
# The runs travel as store snapshots, one file per grid (`gatelab store pack --grid`:
# lab/records/snapshot.py): a call that trains starts by unpacking SNAPSHOTS (default
# docs/store/*.tar.xz, the committed ones, merged into one store) when the machine has no
# store yet, and ends by packing each grid it ran into $OUT/<grid>.tar.xz, so a session that
# runs one grid rewrites only that grid's file; the grids skip finished cells. A call brings
# back at most OUT_FILES_LIMIT files (8 on the lent machines; 0: no limit): a grid whose file
# would not fit among them is not started (the next call runs it). On a machine whose calls each carry at
# most 64 MiB, the corpus (42 MB) and the MLflow wheels (20 MB) with the code and the
# snapshot do not fit one call: the first call carries the corpus (`prepare`, which needs
# no MLflow) and the next ones the wheels; a warm machine keeps what earlier calls left.
# The wheels include psutil and nvidia-ml-py (pinned in pyproject.toml): without them the
# runs train without MLflow's system metrics (GPU utilisation, memory, power) and say so.
# GATELAB_GIT_COMMIT: the commit of the checkout that was sent, for the runs' `git_commit`
# tag, when the machine's copy has no .git or a stale one (send a clean checkout).
# GRID_ARGS: extra `gatelab grid` options, e.g. --no-check on a later call of the same code on
# the same machine (each start's check table is kept on the grid's parent run, check-*.txt).
# CALL_LIMIT_S: the seconds one call of the machine may run in all (600 on the lent H200);
# each grid's limit is then cut to what is left of the call after PACK_RESERVE_S (default 60)
# for stopping the grid and packing the store, so that a call's hard stop never takes the
# store with it (a 2026-12-02 call whose grid limit did not leave that room came back empty).
# The call's whole output is also kept in $OUT/reproduce.log, so a call cut short still
# brings back what it did.
# PACK_COMPILE_CACHE=1: the call also brings back Inductor's cache as
# $OUT/inductor-<gpu>.tar.gz (at most OUT_FILE_LIMIT_BYTES), or, where the machine started
# from carried ones, only what it compiled since, as $OUT/inductor-<gpu>.<phases>-<UTC
# minute>.tar.gz; copied to .compile-cache/ (git ignores it) and carried with the wheels, a
# later session's first call on the same kind of GPU starts with all of them
# (COMPILE_CACHE_DIR names another folder). The tree (21 MB on 2026-12-06), the wheels
# (22.6 MB) and .compile-cache/ travel together within a call's 64 MiB: keep there only the
# caches the call's grids use (git ignores .compile-cache-*/ for those set aside).
# The numerics check's passes (cache/checks: lab/check.py, keyed by the checked code's hash,
# the GPU, the torch/CUDA/cuDNN versions, the preset and the variant) come back as
# $OUT/checks.tar.gz from a call that ran a grid (where a file is left and the folder holds
# a pass); carried in .compile-cache/ like the Inductor cache, the next session's grids skip
# the check for code and GPU it passed on (47-67 s of a session's first call, 2026-12-06)
# and check whatever changed.
# TOKENIZER: optional tokenizer.json to reuse (the one `gatelab prepare` trains on the first
# 32 MB of train-00 is deterministic, so training it again gives the same file).
set -uo pipefail
phases=",${1:-all},"
# want PHASE: PHASE was asked for by name (or, when all is, as one of the grids of `all`)
want() { [[ $phases == *",$1,"* ]] || { [[ $phases == *",all,"* ]] && [ "${2:-}" != named ]; }; }
unknown=$(tr ',' '\n' <<< "${1:-all}" | grep -vxE 'all|prepare|eval-check|reproduce|base|base-init|base-lr|base-steps|sink|sink-long|stability|stability-noqk|stability-graphs-check|init-control|lr-control|report' || true)
if [ -n "$unknown" ]; then echo "error: unknown phase(s): $(paste -sd, <<< "$unknown")" >&2; exit 2; fi
if [ -d .data/gutenberg-en ]; then DATA=${DATA:-.data/gutenberg-en}; else DATA=${DATA:-../shared/data/gutenberg-en}; fi
OUT=${OUT:-reproduction-out}      # where the tarballs and report tables land
WORK=${WORK:-reports}              # where `gatelab report` writes its tables and plots
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/reproduce.log") 2>&1
gatelab() { python3 -m lab "$@"; }
read -ra grid_args <<< "${GRID_ARGS:-}"
# One grid within a phase's limit: `--time-limit` starts no cell that would not end in time
# (the cells in progress finish), and `timeout` 15 s later is the hard stop behind it.
# Under CALL_LIMIT_S the limit is what the call has left (bash's SECONDS: since the script
# began), less the room for packing; a grid with under 90 s left is not started.
ran=()  # the grids this call started, each packed into its own file at the end
# the files a call brings back besides the grids' snapshots: the log, and the report's and
# the eval check's when asked
out_files=1
want report && out_files=$((out_files + 1))
want eval-check named && out_files=$((out_files + 1))
# room_for_a_file: the call can bring back one more file besides those counted so far (the
# log and the others in out_files, and a snapshot for each grid started)
room_for_a_file() { [ "${OUT_FILES_LIMIT:-8}" -le 0 ] || [ $((out_files + ${#ran[@]})) -lt "${OUT_FILES_LIMIT:-8}" ]; }
run_grid() { local limit=$1; shift
  local grid; grid=$(basename "$1" .yaml)  # (each grid file's experiment is its stem)
  if ! room_for_a_file; then
    echo "grid $grid: not started: its snapshot would pass the ${OUT_FILES_LIMIT:-8} files a call brings back; the next call runs it"
    return 0
  fi
  if [ "${CALL_LIMIT_S:-0}" -gt 0 ]; then
    local left=$((CALL_LIMIT_S - SECONDS - ${PACK_RESERVE_S:-60}))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 90 ]; then echo "grid $1: ${limit} s left of the call; not started"; return 0; fi
  fi
  echo "grid $1: limit ${limit} s (${SECONDS} s into the call)"
  ran+=("$grid")
  time timeout "$limit" python3 -m lab grid "$@" --time-limit "$((limit - 15))"; }

store=${GATELAB_STORE:-mlruns}
read -ra snapshots <<< "${SNAPSHOTS:-$(echo docs/store/*.tar.xz)}"
if [ "$phases" != ",report," ]; then
  tokenizer=()
  [ -n "${TOKENIZER:-}" ] && tokenizer=(--tokenizer "$TOKENIZER")
  # (reuses cache/gutenberg-en when it is already prepared from the same files)
  time gatelab prepare --data "$DATA/train-0*.txt.xz" \
    --valid "$DATA/valid.txt.xz" --test "$DATA/test.txt.xz" "${tokenizer[@]}" \
    --out cache/gutenberg-en --quiet || {
    # (nothing can train without the prepared corpus, so stop before unpacking or packing
    # anything; the usual cause: a machine released between calls comes back bare, without
    # the corpus and the cache/ of the call that carried it)
    echo "stop: gatelab prepare failed (above); on a machine that came back bare, carry .data/gutenberg-en and run the prepare phase again"
    exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
[ "$phases" = ",prepare," ] && exit 0
# Inductor's caches (cache/inductor: lab/training/step.py use_compile_cache) from an earlier
# session on the same kind of GPU, carried as $COMPILE_CACHE_DIR/inductor-<gpu>.tar.gz and
# inductor-<gpu>.*.tar.gz (a call with PACK_COMPILE_CACHE=1 brings one back, below): the
# first cell of each
# shape then loads its graphs instead of compiling them (a deep-narrow cell compiled for 89 s
# on a cold cache on 2026-12-06, 2-3 s a cell from the warm one). Inductor keys each entry by
# the torch and Triton versions and the GPU, so a cache from other versions is unused, not
# wrong; the file is named by the GPU, and a machine that already has a cache keeps its own.
inductor=${TORCHINDUCTOR_CACHE_DIR:-cache/inductor}
gpu_kind=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
  tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
# (the whole cache, and one file per call since that brought back only what it compiled: on
# 2026-12-06 a call's 172-MB cache, half of it the carried one, packed to 26.5 MB, over
# what a call brings back, while the CUDA-graph shapes it compiled were about half)
carried=()
for file in "${COMPILE_CACHE_DIR:-.compile-cache}/inductor-${gpu_kind:-none}.tar.gz" \
    "${COMPILE_CACHE_DIR:-.compile-cache}/inductor-${gpu_kind:-none}".*.tar.gz; do
  [ -f "$file" ] && carried+=("$file")
done
# what is newer than this file the machine compiled itself (written where a cache is unpacked)
unpacked_at=$(realpath -m "${inductor%/}.unpacked")
if [ "$phases" != ",report," ] && [ -n "$gpu_kind" ] && [ "${#carried[@]}" -gt 0 ] && [ ! -d "$inductor" ]; then
  mkdir -p "$inductor"
  for file in "${carried[@]}"; do tar xzf "$file" -C "$inductor"; done
  touch "$unpacked_at"
  echo "compile cache: unpacked ${carried[*]} into $inductor ($(du -sm "$inductor" | cut -f1) MB)"
fi
[ "${PACK_COMPILE_CACHE:-0}" = 1 ] && out_files=$((out_files + 1))
checks="${GATELAB_CACHE:-cache}/checks"
carried_checks="${COMPILE_CACHE_DIR:-.compile-cache}/checks.tar.gz"
if [ "$phases" != ",report," ] && [ -f "$carried_checks" ]; then
  # (a pass already on this machine is kept: the names are the keys, the contents the same)
  mkdir -p "$checks" && tar xzf "$carried_checks" -C "$checks" --skip-old-files &&
    echo "checks: unpacked $carried_checks into $checks ($(find "$checks" -name '*.txt' | wc -l) passes)"
fi
# (after prepare: the records import MLflow, which the first call of a machine may not carry)
# (GATELAB_GIT_COMMIT given: the tag is that, without a 4-5-s MLflow import to say so)
echo "git_commit tag: ${GATELAB_GIT_COMMIT:-$(python3 -c 'from lab import records; print(records.git_commit())')}"
if [ -e "$store/mlflow.db" ]; then echo "store: keeping the $store/mlflow.db already here"
elif [ -f "${snapshots[0]}" ]; then gatelab store unpack "${snapshots[@]}" --quiet
else echo "store: none brought; the grids start a new one"; fi
if want reproduce; then
  run_grid "${REPRODUCE_LIMIT_S:-600}" ablations/reproduce.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want base; then
  run_grid "${BASE_LIMIT_S:-600}" ablations/reproduce-base.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want base-init; then
  run_grid "${BASE_LIMIT_S:-600}" ablations/reproduce-base-init.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want base-lr; then
  run_grid "${BASE_LIMIT_S:-600}" ablations/reproduce-base-lr.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want base-steps; then
  run_grid "${BASE_LIMIT_S:-600}" ablations/reproduce-base-steps.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want sink; then
  # (batch 16 at `small`: launch-bound enough that 3 cells share a GPU; SINK_RUNS_PER_GPU)
  run_grid "${SINK_LIMIT_S:-600}" ablations/sink.yaml --gpus all --runs-per-gpu "${SINK_RUNS_PER_GPU:-3}" \
    "${grid_args[@]}" --quiet
fi
if want sink-long; then
  run_grid "${SINK_LIMIT_S:-600}" ablations/sink-long.yaml --gpus all --runs-per-gpu "${SINK_RUNS_PER_GPU:-3}" \
    "${grid_args[@]}" --quiet
fi
if want stability; then
  run_grid "${STABILITY_LIMIT_S:-600}" ablations/stability.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want stability-noqk; then
  run_grid "${STABILITY_LIMIT_S:-600}" ablations/stability-noqk.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want stability-graphs-check named; then
  # (named only: one cell of the ladder without CUDA graphs, the check its G1 3e-2 excursion
  # waits on; the grid file holds its criterion)
  run_grid "${STABILITY_LIMIT_S:-600}" ablations/stability-graphs-check.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want init-control; then
  run_grid "${CONTROL_LIMIT_S:-600}" ablations/reproduce-init.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want lr-control; then
  run_grid "${LR_CONTROL_LIMIT_S:-600}" ablations/reproduce-lr.yaml --gpus all "${grid_args[@]}" --quiet
fi
if want eval-check named; then
  # The logged valid/test losses against float32 and bf16 eager scoring of the same windows
  # from the checkpoints this machine holds (docs/results.md, the test split's spread).
  python3 benchmarks/eval_check.py "${EVAL_GRID:-reproduce}" --max-runs "${EVAL_RUNS:-6}" \
    --out "$OUT/eval-check-${EVAL_GRID:-reproduce}.json" 2>&1 | grep -v "Mismatch dtype\|torch.rms_norm"
fi
if want report; then
  for grid in reproduce reproduce-base reproduce-base-init reproduce-base-lr reproduce-base-steps sink sink-long stability stability-noqk reproduce-init reproduce-lr; do
    options=()  # (the base grid is also read against its depth-scaled-init control)
    [ "$grid" = reproduce-base ] && options=(--control reproduce-base-init)
    # (by its file, so that the report checks the file's `criterion:`, e.g. the stability
    # grids' broke margin of 0.05 nats and the sink grids' premise: docs/grid.md)
    # (each grid's terminal report beside its tables, in the one reports.tgz that comes back)
    gatelab report "ablations/$grid.yaml" "${options[@]}" --out "$WORK/$grid" > "$WORK/report-$grid.md" 2>&1
    tail -20 "$WORK/report-$grid.md"
  done
  tar czf "$OUT/reports.tgz" "$WORK"
fi
# Each grid this call ran as its own snapshot (runs, metrics and artifacts; checkpoints stay on
# the machine), to unpack where the work goes on: `gatelab store unpack docs/store/*.tar.xz`
# with these in place of their grids' files. With the runs' PNG plots while a file stays under
# the 16 MiB a file that a device call brings back (at 48 `reproduce` cells the whole store
# was 17.5 MB with them and 5.5 MB without, and that file did not come back).
for grid in "${ran[@]}"; do
  gatelab store pack "$OUT/$grid.tar.xz" --grid "$grid" --plots --force --quiet
  if [ "$(stat -c %s "$OUT/$grid.tar.xz")" -gt "${OUT_FILE_LIMIT_BYTES:-16000000}" ]; then
    echo "store: $grid over ${OUT_FILE_LIMIT_BYTES:-16000000} bytes with the plots; packed without them"
    gatelab store pack "$OUT/$grid.tar.xz" --grid "$grid" --force --quiet
  fi
done
# (only in a file the call has room for: the grids' snapshots come first; an empty folder,
# e.g. from a carried file that held no pass, takes no file)
if [ "${#ran[@]}" -gt 0 ] && [ -n "$(find "$checks" -name '*.txt' -print -quit 2>/dev/null)" ]; then
  if ! room_for_a_file; then
    echo "checks: no room among the ${OUT_FILES_LIMIT:-8} files a call brings back; not packed"
  else
    tar czf "$OUT/checks.tar.gz" -C "$checks" . &&
      echo "checks: packed $checks into $OUT/checks.tar.gz (carry it as ${COMPILE_CACHE_DIR:-.compile-cache}/ next session)"
  fi
fi
if [ "${PACK_COMPILE_CACHE:-0}" = 1 ] && { [ ! -d "$inductor" ] || [ -z "$gpu_kind" ]; }; then
  # (said, not skipped silently: on 2026-12-06 a grid that trained in its own process
  # compiled into torch's temporary folder, and this step found nothing without a word)
  why="no folder $inductor"; [ -n "$gpu_kind" ] || why="no GPU named by nvidia-smi"
  echo "compile cache: nothing brought back: $why"
elif [ "${PACK_COMPILE_CACHE:-0}" = 1 ]; then
  cache_file="$OUT/inductor-$gpu_kind.tar.gz" newer=()
  if [ -f "$unpacked_at" ]; then  # only what this machine compiled: the carried files stay
    cache_file="$OUT/inductor-$gpu_kind.$(sed 's/^,//; s/,$//; s/,/-/g' <<< "$phases")-$(date -u +%Y%m%d%H%M).tar.gz"
    newer=(-newer "$unpacked_at")
  fi
  # (names relative to the folder, as `tar -C "$inductor" .` gave them; $OUT may be relative)
  find "$inductor" -type f "${newer[@]}" -printf './%P\0' |
    tar czf "$cache_file" -C "$inductor" --null -T -
  packed=$(stat -c %s "$cache_file")
  if [ "$(tar tzf "$cache_file" | wc -l)" -eq 0 ]; then
    echo "compile cache: nothing compiled since the carried cache was unpacked; nothing brought back"
    rm -f "$cache_file"
  elif [ "$packed" -gt "${OUT_FILE_LIMIT_BYTES:-16000000}" ]; then
    # (its sizes say what a smaller cache would need: the folder's and the packed file's)
    echo "compile cache: $inductor is $(du -sm "$inductor" | cut -f1) MB, $packed bytes packed, over ${OUT_FILE_LIMIT_BYTES:-16000000}; not brought back"
    rm -f "$cache_file"
  else
    echo "compile cache: packed $inductor${newer:+ (what this machine compiled)} into $cache_file (carry it as ${COMPILE_CACHE_DIR:-.compile-cache}/ next session)"
  fi
fi
ls -la "$OUT"
