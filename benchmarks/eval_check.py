"""Is a run's logged test (and validation) loss what its weights give? A numerics check of the
evaluation path (docs/results.md, "Progress of the redo": the test split's spread).

For each finished run of an experiment whose checkpoint is on this machine, the run's own
evaluation windows (the loader's: `val_batches` x `micro_batch` windows spread over the split)
are scored again from `last.ckpt` by the analysis' eager scorer (lab/analysis/perplexity.py
mean_loss) in float32 and in bf16 autocast, beside
what the run logged (`val/final_loss`, `test/loss`: bf16, through the compiled training call
on a GPU). Agreement within bf16's noise (~1e-2) says the logged numbers are the weights'.

    python3 benchmarks/eval_check.py EXPERIMENT [--tracking-uri URI] [--max-runs N] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from lab import records
from lab.analysis.perplexity import mean_loss
from lab.data.windows import eval_windows
from lab.model.decoder import Decoder
from lab.training.corpus import open_data


def check_run(run, device) -> dict:
    path = records.checkpoint_dir(run.info.run_id) / "last.ckpt"
    config, state, step = records.read_checkpoint(path, "eval_check")
    model = Decoder(config.model).to(device)
    model.load_state_dict(state)
    model.eval()
    store, _ = open_data(config)
    t = config.train
    row = {"run": run.info.run_name, "step": step}
    for split, logged in (("valid", "val/final_loss"), ("test", "test/loss")):
        windows = eval_windows(store, split, config.model.context, t.val_batches * t.micro_batch,
                               config.data.bos_aligned, config.data.bos_prefix)
        row[f"{split}_logged"] = run.data.metrics.get(logged, math.nan)
        # the analysis' own eager scoring (lab/analysis/perplexity.py), in both precisions
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            row[f"{split}_{name}"] = mean_loss(model, windows, t.micro_batch,
                                               torch.device(device), dtype)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--max-runs", type=int, default=0, help="0: every run with a checkpoint")
    parser.add_argument("--out", help="JSON output")
    args = parser.parse_args()
    uri = records.tracking_uri(args.tracking_uri)
    client = records.client(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    runs = [r for r in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
            if (records.checkpoint_dir(r.info.run_id) / "last.ckpt").exists()]
    if args.max_runs:
        runs = runs[:args.max_runs]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for run in runs:
        row = check_run(run, device)
        rows.append(row)
        print(f"{row['run'][:44]:44} valid logged {row['valid_logged']:.4f} fp32 {row['valid_fp32']:.4f} "
              f"bf16 {row['valid_bf16']:.4f} | test logged {row['test_logged']:.4f} "
              f"fp32 {row['test_fp32']:.4f} bf16 {row['test_bf16']:.4f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
