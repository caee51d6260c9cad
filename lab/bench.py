"""`gatelab bench`: tokens/s, step time, MFU and peak memory, the lab path against a bare loop.

Two loops over the same model, micro-batches and optimizer settings:
- bare: a compiled PyTorch loop (bf16 autocast, fused AdamW, clipping), nothing else. It is
  the reference the full lab path is held to.
- lab: `lab.training.run.train_run`, i.e. Lightning Trainer + MLflow logging + loss monitor, spike
  detector and checkpoint callbacks, timed by a callback from the end of warm-up to the end.
Both skip `warmup` steps (compilation, allocator warm-up) before timing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

from lab import records
from lab.config import RunConfig, resolve
from lab.errors import LabError
from lab.model.decoder import Decoder
from lab.model.params import count_params, model_flops_per_token
from lab.training.corpus import open_data
from lab.training.run import train_run
from lab.training.callbacks import device_peak_tflops
from lab.training.step import (adamw, begin_cudagraph_step, compile_model, step_loss,
                               train_sampler, uses_cudagraphs)
from lab.training.preflight import preflight
from lab.training.schedule import accumulation


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_config(variant: str, preset: str, steps: int, warmup: int, data: str,
                 overrides: list[str], devices: int = 1) -> RunConfig:
    """The run `gatelab train` would make (compile, precision, validation and checkpoint
    cadence at their defaults), for warmup + steps steps; only the end-of-run probe analysis
    and long-context evaluation are off: minutes after the last step that time nothing."""
    config = resolve(variant, preset, overrides, data=data)
    tokens_per_step = config.train.batch_size * config.model.context
    train = dataclasses.replace(config.train, tokens=(steps + warmup) * tokens_per_step,
                                devices=devices, analysis_windows=0, long_context_factors="")
    return dataclasses.replace(config, train=train)


class BareLoop:
    """The reference: the same work as a lab training step, with nothing around it.

    Built and warmed up once; `time(steps)` can then be called again and again, so that the
    models of one preset can be timed in interleaved rounds (drift of the GPU's clocks over a
    run then falls on every model alike, not on whichever ran last)."""

    def __init__(self, config: RunConfig, warmup: int):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        held_before = _allocated()
        preflight(config, self.device)
        store, config = open_data(config)
        self.config = config
        t = config.train
        torch.manual_seed(t.seed)
        self.model = Decoder(config.model).to(self.device)
        self.model.loss_kernel = t.fused_loss
        if t.compile_on(self.device == "cuda"):
            compile_model(self.model, t.compile_mode)
        self.optimizer = adamw(self.model.named_parameters(), config, fused=self.device == "cuda")
        self.sampler = train_sampler(store, config)
        self.accumulate = accumulation(config)
        bf16 = t.precision_on(self.device == "cuda") == "bf16-mixed"  # as the lab path trains
        self.autocast = torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=bf16)
        self.flops_per_token = model_flops_per_token(config)
        self.cudagraphs = uses_cudagraphs(t, self.device == "cuda")
        self.index = 0
        for _ in range(warmup):
            self.step()
        _sync()
        # Weights, gradients' absence (set_to_none) and optimizer state: what this model
        # holds between steps, to tell its own peak from the other models' resident memory.
        self.resident = _allocated() - held_before

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def step(self) -> None:
        begin_cudagraph_step(self.cudagraphs)  # as the lab path's training_step
        for _ in range(self.accumulate):
            inputs, targets = self.sampler.batch(self.index)
            self.index += 1
            with self.autocast:
                loss, _, _ = step_loss(self.model, self._to_device(inputs), self._to_device(targets))
            (loss / self.accumulate).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time(self, steps: int) -> dict:
        """Tokens/s, step time, MFU and this model's own peak memory over `steps` steps."""
        return time_steps(self.step, steps, self.config, self.flops_per_token, self.resident)

    def close(self) -> None:
        del self.model, self.optimizer
        if self.device == "cuda":
            torch.cuda.empty_cache()


def time_steps(step, steps: int, config: RunConfig, flops_per_token: float,
               resident: int = 0) -> dict:
    """`steps` calls of `step` timed between two syncs: tokens/s (a step being
    `config.train.batch_size` windows of its context), step time, MFU, and the peak memory
    less what other models held beside this one's `resident` bytes. BareLoop's timing, and
    benchmarks/stacked_seeds.py's (whose config counts every seed's windows)."""
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    others = _allocated() - resident
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    elapsed = time.perf_counter() - start
    peak = ((torch.cuda.max_memory_allocated() - others) / 2 ** 30
            if torch.cuda.is_available() else None)
    return _rates(config, steps, elapsed, peak, flops_per_token)


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def time_bare_loops(configs: list[RunConfig], steps: int, warmup: int, rounds: int,
                    profile_to: list[Path | None]) -> list[dict]:
    """Build and warm every loop, then time `rounds` rounds of `steps` steps, the loops in
    turn each round. Each loop's result is its median round (by tokens/s), with every
    round's tokens/s beside it when there is more than one."""
    torch._dynamo.reset()  # these models compile afresh (no recompile-limit fallbacks)
    # Every model compiles the same Decoder.forward; one cache entry each must fit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(configs))
    loops = [BareLoop(config, warmup) for config in configs]
    per_loop: list[list[dict]] = [[] for _ in loops]
    for _ in range(rounds):
        for loop, timings in zip(loops, per_loop):
            timings.append(loop.time(steps))
    results = []
    for loop, timings, path in zip(loops, per_loop, profile_to):
        result = sorted(timings, key=lambda r: r["tokens_per_s"])[(len(timings) - 1) // 2]
        if rounds > 1:
            result = dict(result, rounds_tokens_per_s=[r["tokens_per_s"] for r in timings])
        if path is not None:
            _profile(loop.step, path, loop.device)
        results.append(result)
    for loop in loops:
        loop.close()
    return results


PROFILED_STEPS = 3


def _profile(step, path: Path, device: str) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        _sync()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{PROFILED_STEPS} steps, sorted by {sort_by}\n"
                    + prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90))


def _rates(config: RunConfig, steps: int, elapsed: float, peak_gib: float | None,
           flops_per_token: float) -> dict:
    tokens = steps * config.train.batch_size * config.model.context
    tokens_per_s = tokens / elapsed
    out = {"tokens_per_s": tokens_per_s, "step_ms": 1000 * elapsed / steps, "peak_mem_gib": peak_gib}
    peak = device_peak_tflops()
    if peak:
        out["mfu"] = flops_per_token * tokens_per_s / (peak * 1e12 * config.train.devices)
    return out


class SteadyStateTimer(L.Callback):
    """Times the lab path's steps, from the end of warm-up to the end of the last step. The
    end-of-run work (final checkpoint, evaluation, analysis) is a one-off cost outside the
    window, as it is outside the bare loop's."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = self.peak_gib = None
        self.start_step = self.end_step = warmup

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup:
            _sync()
            self.start, self.start_step = time.perf_counter(), trainer.global_step
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        elif self.start is not None and self.end is None and trainer.global_step >= trainer.max_steps:
            self._stop(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.end is None:  # stopped before max_steps (divergence)
            self._stop(trainer)

    def _stop(self, trainer) -> None:
        _sync()
        self.end, self.end_step = time.perf_counter(), trainer.global_step
        if torch.cuda.is_available():  # the steps' peak, before any end-of-run work
            self.peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30


def lab_loop(config: RunConfig, steps: int, warmup: int, uri: str) -> dict:
    timer = SteadyStateTimer(warmup)
    result = train_run(config, uri, experiment="bench", quiet=True, callbacks=[timer])
    if timer.start is None or timer.end_step <= timer.start_step:
        raise LabError("bench: the lab path finished before warm-up ended; raise --steps")
    out = _rates(config, timer.end_step - timer.start_step, timer.end - timer.start,
                 timer.peak_gib, model_flops_per_token(config))
    out["run_id"] = result.run_id
    # What the run itself logged: training time only (no validation or checkpoint writes),
    # beside the timer's wall clock, which has them (lab/training/callbacks.py LossMonitor).
    out["logged_tokens_per_s"] = result.metrics.get("throughput/tokens_per_s_mean")
    return out


def run_bench(presets: list[str], variants: list[str], steps: int, warmup: int, data: str,
              overrides: list[str], devices: int, lab_variants: list[str], out: Path,
              uri: str | None = None, profile: bool = False, rounds: int = 1) -> dict:
    """rounds > 1: a preset's variants are built together and timed in `rounds` interleaved
    rounds (median reported), which makes small overheads measurable; they then share the
    GPU's memory, so each model's peak is counted without the others' resident memory.
    rounds = 1: one model at a time, compiled and timed alone."""
    if rounds < 1:
        raise LabError(f"bench: --rounds must be at least 1, got {rounds}")
    # Validate every configuration before any GPU work.
    plan = [(p, v, bench_config(v, p, steps, warmup, data, overrides, devices))
            for p in presets for v in variants]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    report = {"date": datetime.date.today().isoformat(), "device": device_name,
              "peak_bf16_tflops": device_peak_tflops(),
              "torch": torch.__version__, "steps": steps, "warmup": warmup, "data": data,
              "devices": devices, "overrides": overrides, "rounds": rounds, "results": []}
    print(f"device: {device_name}; dense bf16 peak used for MFU: {report['peak_bf16_tflops']} TFLOP/s",
          flush=True)
    # The lab-path runs go to their own store beside the main one (mlruns/bench.db), not a
    # temporary file: MLflow keeps SQLite engines open per URI for the life of the process.
    if uri is None:
        records.store_dir().mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{records.store_dir() / 'bench.db'}"
    for preset in presets:
        plan_of_preset = [(v, c) for p, v, c in plan if p == preset]
        rows = []
        for variant, config in plan_of_preset:
            counts = count_params(config)
            rows.append({"preset": preset, "variant": variant, "params": counts["total"],
                         "micro_batch": config.train.micro_batch, "batch": config.train.batch_size})
        report["results"].extend(rows)
        if devices == 1:
            # Interleaved rounds need the preset's models together; one round needs one at a time.
            groups = [list(range(len(rows)))] if rounds > 1 else [[i] for i in range(len(rows))]
            for group in groups:
                profile_to = [out.with_name(f"{out.stem}-profile-{preset}-{rows[i]['variant']}.txt")
                              if profile else None for i in group]
                timed = time_bare_loops([plan_of_preset[i][1] for i in group], steps, warmup,
                                        rounds, profile_to)
                for i, result in zip(group, timed):
                    rows[i]["bare"] = result
                    print(format_row(rows[i]), flush=True)
                _write(report, out)
        for row, (variant, config) in zip(rows, plan_of_preset):
            if variant in lab_variants or devices > 1:
                torch._dynamo.reset()
                row["lab"] = lab_loop(config, steps, warmup, uri)
                print(format_row(row), flush=True)
                _write(report, out)
    if _write(report, out):
        print(format_table(report))
        print(f"wrote {out}")
    return report


def _write(report: dict, out: Path) -> bool:
    """Rank 0 writes the JSON after every row, so a crash keeps what was measured."""
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return True


def format_row(row: dict) -> str:
    parts = [f"{row['preset']:>11} {row['variant']:<36}"]
    for kind in ("bare", "lab"):
        if kind in row:
            r = row[kind]
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "-"
            parts.append(f"{kind}: {r['tokens_per_s']:,.0f} tok/s {r['step_ms']:.1f} ms MFU {mfu} {mem}")
    return " | ".join(parts)


def tokens_ratio(row: dict, base: dict) -> float:
    """A variant's tokens/s over its baseline's: the median of the per-round ratios when both
    were timed in the same interleaved rounds (pairing cancels drift common to a round),
    else the ratio of the two results."""
    rounds, base_rounds = row.get("rounds_tokens_per_s"), base.get("rounds_tokens_per_s")
    if rounds and base_rounds and len(rounds) == len(base_rounds):
        return statistics.median(a / b for a, b in zip(rounds, base_rounds))
    return row["tokens_per_s"] / base["tokens_per_s"]


def format_table(report: dict) -> str:
    """Markdown: one row per preset x variant, overhead against the preset's baseline. The
    overhead is split: "vs baseline" in tokens/s, and "beyond FLOPs" as the loss in MFU (each
    model's MFU counts its own parameters), i.e. the cost of a gate beyond the arithmetic it adds."""
    lines = ["| preset | variant | params | bare tok/s | step ms | MFU | peak GiB | overhead vs baseline "
             "| beyond FLOPs | lab tok/s | lab / bare |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    baseline = {r["preset"]: r for r in report["results"] if r["variant"] == "baseline"}
    for r in report["results"]:
        bare, lab = r.get("bare", {}), r.get("lab", {})
        base = baseline.get(r["preset"], {}).get("bare")
        overhead = beyond = "-"
        if bare and base:
            ratio_tokens = tokens_ratio(bare, base)
            overhead = f"{100 * (1 - ratio_tokens):+.1f}%"
            if bare.get("mfu") and base.get("mfu"):
                # MFU per token/s is the model's FLOPs per token over the peak
                flops_ratio = (bare["mfu"] / bare["tokens_per_s"]) / (base["mfu"] / base["tokens_per_s"])
                beyond = f"{100 * (1 - ratio_tokens * flops_ratio):+.1f}%"
        ratio = f"{lab['tokens_per_s'] / bare['tokens_per_s']:.3f}" if bare and lab else "-"
        mfu = f"{100 * bare['mfu']:.1f}%" if bare.get("mfu") is not None else (
            f"{100 * lab['mfu']:.1f}%" if lab.get("mfu") is not None else "-")
        mem = bare.get("peak_mem_gib") or lab.get("peak_mem_gib")
        mem_text = f"{mem:.1f}" if mem is not None else "-"
        step_ms = bare.get("step_ms", lab.get("step_ms", 0))
        lines.append(f"| {r['preset']} | {r['variant']} | {r['params'] / 1e6:.1f}M | "
                     f"{bare.get('tokens_per_s', 0):,.0f} | {step_ms:.1f} | {mfu} | {mem_text} | "
                     f"{overhead} | {beyond} | {lab.get('tokens_per_s', 0):,.0f} | {ratio} |")
    return "\n".join(lines)
