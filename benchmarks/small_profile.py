"""Where a `small` step goes, bare loop against the lab default path, in one process on one GPU.

For each loop: tokens/s over a steady window, the GPU's kernel time per step (torch.profiler,
summed over the kernels of a few steps), hence how much of the step the GPU is busy; for the
lab path also each validation's wall time (the one-off of the first validation inside a
compiled run), the host's Python time by function over 60 steps (cProfile), and the same with
CUDA graphs (`train.compile_mode=reduce-overhead`). Then the bare loop at `base` for its MFU.
Run with TORCH_LOGS=recompiles,graph_breaks to see what recompiles and why.

    python3 benchmarks/small_profile.py $OUT/small_profile.json
"""

import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.bench import BareLoop, SteadyStateTimer, _rates, bench_config  # noqa: E402
from lab.model.params import model_flops_per_token  # noqa: E402


def gpu_ms_per_step(step, steps: int = 8) -> float:
    """Kernel time per step on the GPU (all streams), from the profiler."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return kernel_us / 1000 / steps


def graph_breaks() -> int:
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


def rates(config, steps: int, seconds: float) -> dict:
    """Tokens/s, step time and MFU as `gatelab bench` computes them."""
    return _rates(config, steps, seconds, None, model_flops_per_token(config))


def bare(preset: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    torch._dynamo.reset()
    config = bench_config("baseline", preset, steps, warmup, "synthetic", overrides)
    loop = BareLoop(config, warmup)
    out = rates(config, steps, loop.time(steps)["step_ms"] * steps / 1000)
    out["gpu_kernel_ms_per_step"] = gpu_ms_per_step(loop.step)
    out["gpu_busy"] = out["gpu_kernel_ms_per_step"] / out["step_ms"]
    out["graph_breaks"] = graph_breaks()
    loop.close()
    return out


class Probe(L.Callback):
    """Step wall times, validation wall times, a cProfile of steps [a, b) and the GPU kernel
    time of steps [c, c + 8)."""

    def __init__(self, profile_steps=(100, 160), gpu_steps=(170, 178)):
        self.profile_steps, self.gpu_steps = profile_steps, gpu_steps
        self.step_ends, self.validations = [], []
        self.profiler = cProfile.Profile()
        self.torch_profiler = None
        self.host_profile = ""
        self.gpu_ms = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step == self.profile_steps[0]:
            self.profiler.enable()
        if step == self.gpu_steps[0]:
            torch.cuda.synchronize()
            self.torch_profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CUDA])
            self.torch_profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.step_ends.append((step, time.perf_counter()))
        if step == self.profile_steps[1]:
            self.profiler.disable()
            text = io.StringIO()
            pstats.Stats(self.profiler, stream=text).sort_stats("tottime").print_stats(35)
            self.host_profile = text.getvalue()
        if step == self.gpu_steps[1] and self.torch_profiler is not None:
            torch.cuda.synchronize()
            self.torch_profiler.__exit__(None, None, None)
            us = sum(e.self_device_time_total for e in self.torch_profiler.key_averages())
            self.gpu_ms = us / 1000 / (self.gpu_steps[1] - self.gpu_steps[0])
            self.torch_profiler = None

    def on_validation_start(self, trainer, pl_module):
        torch.cuda.synchronize()
        self._val = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.validations.append((trainer.global_step, time.perf_counter() - self._val))


def lab(preset: str, steps: int, warmup: int, overrides: list[str], uri: str) -> dict:
    from lab.training.run import train_run

    torch._dynamo.reset()
    config = bench_config("baseline", preset, steps, warmup, "synthetic", overrides)
    timer, probe = SteadyStateTimer(warmup), Probe()
    started = time.perf_counter()
    result = train_run(config, uri, experiment="small-profile", quiet=True,
                       callbacks=[timer, probe])
    out = rates(config, timer.end_step - timer.start_step, timer.end - timer.start)
    out["run_wall_s"] = time.perf_counter() - started
    out["logged_tokens_per_s"] = result.metrics.get("throughput/tokens_per_s_mean")
    out["compile_s"] = result.metrics.get("time/compile_s")
    out["first_step_s"] = result.metrics.get("time/first_step_s")
    out["validations_s"] = probe.validations
    out["gpu_kernel_ms_per_step"] = probe.gpu_ms
    # steady host step time between steps 100 and 160 (cProfile slows it), and 20..95
    ends = dict(probe.step_ends)
    if 20 in ends and 95 in ends:
        out["wall_ms_steps_20_95"] = 1000 * (ends[95] - ends[20]) / 75
    if probe.gpu_ms and "wall_ms_steps_20_95" in out:
        out["gpu_busy"] = probe.gpu_ms / out["wall_ms_steps_20_95"]
    out["graph_breaks"] = graph_breaks()
    out["host_profile"] = probe.host_profile
    return out


def main() -> None:
    out_path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/small_profile.json")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": {}}
    uri = f"sqlite:///{tempfile.mkdtemp()}/profile.db"
    plan = [
        ("bare small", lambda: bare("small", 100, 15, [])),
        ("lab small", lambda: lab("small", 300, 15, [], uri)),
        ("bare small reduce-overhead",
         lambda: bare("small", 100, 15, ["train.compile_mode=reduce-overhead"])),
        ("lab small reduce-overhead",
         lambda: lab("small", 300, 15, ["train.compile_mode=reduce-overhead"], uri)),
        ("bare base", lambda: bare("base", 30, 10, [])),
    ]
    for name, job in plan:
        try:
            row = job()
        except Exception as err:  # report it and go on with the rest
            row = {"error": f"{type(err).__name__}: {err}"[:400]}
        report["rows"][name] = row
        printable = {k: v for k, v in row.items() if k != "host_profile"}
        print(name, json.dumps(printable), flush=True)
        out_path.write_text(json.dumps(report, indent=2))
    for name, row in report["rows"].items():
        if row.get("host_profile"):
            print(f"== host profile, {name} ==\n{row['host_profile'][:6000]}")


if __name__ == "__main__":
    main()
