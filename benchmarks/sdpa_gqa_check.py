"""Which SDPA kernels take GQA (enable_gqa) at the lab's shapes, and how fast each path is.

Run on a GPU: python3 benchmarks/sdpa_gqa_check.py
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, H, G, T, D = 64, 8, 4, 1024, 64  # the base preset's attention
q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(B, G, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(B, G, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def gqa(backend):
    def fn():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()
    return fn


def repeated(backend):
    def fn():
        kr, vr = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        out.sum().backward()
    return fn


for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                      ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
    for label, make in [("enable_gqa", gqa), ("repeat_interleave", repeated)]:
        try:
            print(f"{name:9} {label:17} fwd+bwd {timed(make(backend)):.2f} ms")
        except RuntimeError as err:
            print(f"{name:9} {label:17} unsupported: {str(err).splitlines()[0][:80]}")
print(f"default   enable_gqa        fwd+bwd {timed(gqa([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])):.2f} ms")
