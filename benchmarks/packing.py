"""Cells packed onto one GPU: aggregate tokens/s of N lab-default runs trained at once.

For each N, starts N processes together, each a `gatelab train`-equivalent run (lab.training.run.
train_run with the preset's defaults: compiled, bf16, default validation and checkpoint
cadence; end-of-run analysis off) on its own SQLite store, and reads back each run's logged
steady tokens/s (training time only) and peak memory, and the wall-clock span of its steady
window. The aggregate is the sum of the runs' steady rates over the span all of them were in
their steady window (the overlap is printed: near 1 means they ran side by side throughout).

    python3 benchmarks/packing.py OUT.json [preset] [steps] [max N]
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import lightning as L
from lab.bench import bench_config
from lab.training.run import train_run

class Window(L.Callback):
    first = end = None
    def on_train_batch_end(self, trainer, *args):
        if self.first is None:
            import torch; torch.cuda.synchronize(); self.first = time.time()
    def on_train_end(self, trainer, *args):
        import torch; torch.cuda.synchronize(); self.end = time.time()

preset, steps, uri, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
config = bench_config("baseline", preset, steps, 0, "synthetic", [])
window = Window()
result = train_run(config, uri, experiment="packing", quiet=True, callbacks=[window])
json.dump({"tokens_per_s": result.metrics.get("throughput/tokens_per_s_mean"),
           "peak_gib": result.metrics.get("memory/peak_gib"),
           "compile_s": result.metrics.get("time/compile_s"),
           "first": window.first, "end": window.end}, open(out, "w"))
"""


def main() -> None:
    out = Path(sys.argv[1])
    preset = sys.argv[2] if len(sys.argv) > 2 else "small"
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    most = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    root = Path(tempfile.mkdtemp())
    repo = str(Path(__file__).resolve().parents[1])
    report = {"preset": preset, "steps": steps, "rows": []}
    for n in range(1, most + 1):
        started = time.time()
        children = []
        for i in range(n):
            result_file = root / f"n{n}-{i}.json"
            uri = f"sqlite:///{root}/n{n}-{i}.db"
            children.append((result_file, subprocess.Popen(
                [sys.executable, "-c", CHILD, preset, str(steps), uri, str(result_file)],
                cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        runs = []
        for result_file, child in children:
            _, err = child.communicate()
            if child.returncode != 0:
                raise SystemExit(f"N={n}: a run failed: {err.strip().splitlines()[-1:]}")
            runs.append(json.loads(result_file.read_text()))
        overlap = max(0.0, min(r["end"] for r in runs) - max(r["first"] for r in runs))
        mean_span = sum(r["end"] - r["first"] for r in runs) / n
        row = {"n": n, "aggregate_tokens_per_s": sum(r["tokens_per_s"] for r in runs),
               "per_run_tokens_per_s": [r["tokens_per_s"] for r in runs],
               "peak_gib_per_run": max(r["peak_gib"] for r in runs),
               "overlap": overlap / mean_span, "wall_s": time.time() - started}
        report["rows"].append(row)
        print(f"N={n}: {row['aggregate_tokens_per_s']:,.0f} tokens/s together "
              f"({row['aggregate_tokens_per_s'] / report['rows'][0]['aggregate_tokens_per_s']:.2f}x "
              f"one run), peak {row['peak_gib_per_run']:.1f} GiB per run, overlap "
              f"{row['overlap']:.2f}, {row['wall_s']:.0f} s", flush=True)
        out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
