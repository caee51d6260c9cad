#!/usr/bin/env bash
# The whole GPU reproduction (docs/results.md), as run on a 4 x H200 machine.
# DATA: the Gutenberg folder (../shared/data/gutenberg-en in a checkout beside shared/).
# TOKENIZER: optional tokenizer.json to reuse (the one `gatelab prepare` trains on the first
# 32 MB of train-00 is deterministic, so training it again gives the same file).
set -uo pipefail
DATA=${DATA:-../shared/data/gutenberg-en}
OUT=${OUT:-reproduction-out}      # where the tarballs and report tables land
WORK=${WORK:-reports}              # where `gatelab report` writes its tables and plots
mkdir -p "$OUT" "$WORK"
gatelab() { python3 -m lab "$@"; }
tokenizer=()
[ -n "${TOKENIZER:-}" ] && tokenizer=(--tokenizer "$TOKENIZER")
time gatelab prepare --data "$DATA/train-0[01].txt.xz" --valid "$DATA/valid.txt.xz" \
  --test "$DATA/test.txt.xz" "${tokenizer[@]}" --out cache/gutenberg-en --quiet
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
time timeout "${REPRODUCE_LIMIT_S:-400}" python3 -m lab grid ablations/reproduce.yaml --gpus all --quiet
time timeout "${STABILITY_LIMIT_S:-110}" python3 -m lab grid ablations/stability.yaml --gpus all --quiet
gatelab report reproduce --out "$WORK/reproduce" > "$OUT/report-reproduce.md" 2>&1
gatelab report stability --out "$WORK/stability" > "$OUT/report-stability.md" 2>&1
tail -40 "$OUT/report-reproduce.md"; tail -12 "$OUT/report-stability.md"
# The MLflow store without checkpoints (those stay on the machine).
tar czf "$OUT/mlruns.tgz" --exclude=mlruns/checkpoints mlruns
tar czf "$OUT/reports.tgz" "$WORK"
ls -la "$OUT"
