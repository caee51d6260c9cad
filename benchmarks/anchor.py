"""The anchored benchmark: in one process on one GPU, at `small` and `medium`,
- the bare loop (lab.bench.BareLoop: compiled, bf16 autocast, fused AdamW, clipping),
- the lab default path (`gatelab train` as a user runs it: lab.training.run.train_run on the preset's
  defaults, compile on, validation and checkpoints at their default cadence), timed by wall
  clock from the end of warm-up to the last step, and by the run's own logged steady rate,
- a plain loop over Hugging Face transformers' Qwen3ForCausalLM of the same shape (what a
  user would otherwise pick), compiled and eager, with the same optimizer and clipping.

Synthetic tokens, context 1024, each preset's batch. Writes a JSON (argument 1, default
benchmarks/anchor.json) and prints a Markdown table.

    python3 benchmarks/anchor.py $OUT/anchor.json [presets] [timed steps] [warm-up steps]
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.bench import BareLoop, SteadyStateTimer, bench_config  # noqa: E402
from lab.model.params import model_flops_per_token  # noqa: E402
from lab.training.callbacks import device_peak_tflops  # noqa: E402


def hf_loop(config, steps: int, warmup: int, compiled: bool) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    m, t = config.model, config.train
    hf_config = Qwen3Config(vocab_size=m.vocab_size, hidden_size=m.d_model,
                            intermediate_size=m.ffn_hidden, num_hidden_layers=m.n_layers,
                            num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                            head_dim=m.head_dim, max_position_embeddings=m.context,
                            rope_theta=m.rope_base, rms_norm_eps=m.rms_eps,
                            tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0)
    hf_config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(hf_config).cuda()
    if compiled:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                  weight_decay=t.weight_decay, fused=True)
    micro = t.micro_batch
    accumulate = t.batch_size // micro
    generator = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(m.vocab_size, (micro, m.context), device="cuda", generator=generator)
               for _ in range(4)]

    def step(i):
        for j in range(accumulate):
            ids = batches[(i * accumulate + j) % len(batches)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = rates(config, steps, elapsed)
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def rates(config, steps: int, seconds: float) -> dict:
    tokens_per_s = steps * config.train.batch_size * config.model.context / seconds
    peak = device_peak_tflops()
    return {"tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / steps,
            "mfu": model_flops_per_token(config) * tokens_per_s / (peak * 1e12) if peak else None}


def lab_default(config, steps: int, warmup: int, uri: str) -> dict:
    from lab.training.run import train_run

    timer = SteadyStateTimer(warmup)
    result = train_run(config, uri, experiment="anchor", quiet=True, callbacks=[timer])
    out = rates(config, timer.end_step - timer.start_step, timer.end - timer.start)
    out["logged_tokens_per_s"] = result.metrics.get("throughput/tokens_per_s_mean")
    out["logged_mfu"] = result.metrics.get("throughput/mfu")
    out["compile_s"] = result.metrics.get("time/compile_s")
    out["peak_mem_gib"] = timer.peak_gib
    return out


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/anchor.json")
    presets = (sys.argv[2] if len(sys.argv) > 2 else "small,medium").split(",")
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 15
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": []}
    uri = f"sqlite:///{tempfile.mkdtemp()}/anchor.db"
    for preset in presets:
        # enough steps for the default validation (and its checkpoint) to fall in the window
        timed = steps or {"small": 240, "medium": 60}.get(preset, 60)
        config = bench_config("baseline", preset, timed, warmup, "synthetic", [])
        row = {"preset": preset, "steps": timed, "warmup": warmup}
        torch._dynamo.reset()
        bare = BareLoop(config, warmup)
        row["bare"] = dict(bare.time(timed), peak_mem_gib=None)
        bare.close()
        print(preset, "bare", row["bare"], flush=True)
        torch._dynamo.reset()
        row["lab_default"] = lab_default(config, timed, warmup, uri)
        print(preset, "lab default", row["lab_default"], flush=True)
        for compiled in (True, False):
            torch._dynamo.reset()
            key = "hf_compiled" if compiled else "hf_eager"
            try:
                row[key] = hf_loop(config, timed if compiled else max(10, timed // 4), warmup, compiled)
            except Exception as err:  # report, do not lose the rest of the table
                row[key] = {"error": f"{type(err).__name__}: {err}"[:200]}
            print(preset, key, row[key], flush=True)
        report["rows"].append(row)
        out.write_text(json.dumps(report, indent=2))
    print(table(report))


def table(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, {report['date']}; tokens/s (MFU)",
             "| preset | bare compiled loop | lab default (wall, val+ckpt in window) | lab logged steady "
             "| lab / bare | HF Qwen3 compiled | HF Qwen3 eager |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def cell(r):
        if not r or "error" in r:
            return (r or {}).get("error", "-")
        mfu = f" ({100 * r['mfu']:.1f}%)" if r.get("mfu") else ""
        return f"{r['tokens_per_s']:,.0f}{mfu}"

    for row in report["rows"]:
        bare, lab = row["bare"], row["lab_default"]
        logged = lab.get("logged_tokens_per_s")
        lines.append(f"| {row['preset']} | {cell(bare)} | {cell(lab)} | "
                     f"{logged:,.0f} | {lab['tokens_per_s'] / bare['tokens_per_s']:.3f} "
                     f"(logged {logged / bare['tokens_per_s']:.3f}) | "
                     f"{cell(row.get('hf_compiled'))} | {cell(row.get('hf_eager'))} |"
                     if logged else f"| {row['preset']} | {cell(bare)} | {cell(lab)} | - | - | "
                     f"{cell(row.get('hf_compiled'))} | {cell(row.get('hf_eager'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
