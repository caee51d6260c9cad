"""Standalone reproduction (torch only): SDPA on a V that is a misaligned strided view.

The lab's headwise-gate model at `small` computed [q | k | v | gate] in one matmul of
384 + 192 + 192 + 6 = 774 output columns and handed SDPA a V that was a view into that
output, with a row stride of 774 bf16 values (1,548 bytes, not a multiple of 16). On an
H200 with torch 2.11.0+cu130 and cuDNN 9.19, the cuDNN backend (PyTorch's default pick
there) returned wrong outputs and gradients with no error, and the flash backend failed with
"CUDA error: misaligned address". This script shows it for several row strides, each
(layout, backend) case in a fresh process, since a CUDA error poisons the context.

Errors are max |fast - reference| of the output and of the gradient of V, against the
float32 math backend on the same (upcast) inputs.

    python3 benchmarks/sdpa_layout_check.py            # every case, one table
    python3 benchmarks/sdpa_layout_check.py CASE BACKEND   # one case (what the table runs)
"""

import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, T, H, G, D = 8, 1024, 6, 3, 64       # the `small` preset's attention, batch 8
V_OFFSET = H * D + G * D                # V's columns start after q and k: 576
# case -> row stride of the fused output holding V (None: V is a contiguous tensor)
CASES = {"stride-774 (old headwise fused width)": 774,
         "stride-771 (value headwise gate width)": 771,
         "stride-776 (774 padded to a multiple of 8)": 776,
         "stride-774, v.contiguous()": -774}
BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def inputs(stride: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=generator)
    k = torch.randn(B, G, T, D, device="cuda", dtype=torch.bfloat16, generator=generator)
    fused = torch.randn(B, T, abs(stride), device="cuda", dtype=torch.bfloat16, generator=generator)
    v = fused[..., V_OFFSET:V_OFFSET + G * D].view(B, T, G, D).transpose(1, 2)
    if stride < 0:
        v = v.contiguous()
    return q, k, v


def run_case(case: str, backend: str) -> dict:
    q, k, v = inputs(CASES[case])
    v.requires_grad_(True)
    grad_out = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator(device="cuda").manual_seed(1))
    # reference: float32 math backend, same values
    q32, k32 = q.float(), k.float()
    v32 = v.detach().float().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True)
    ref.backward(grad_out.float())
    chosen = BACKENDS[backend]
    try:
        if chosen is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            with sdpa_kernel(chosen):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(grad_out)
        torch.cuda.synchronize()
    except RuntimeError as err:
        return {"error": str(err).splitlines()[0][:80]}
    return {"forward": (out.float() - ref).abs().max().item(),
            "grad_v": (v.grad.float() - v32.grad).abs().max().item(),
            "v_stride": list(v.stride()), "ref_max": ref.abs().max().item()}


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(run_case(sys.argv[1], sys.argv[2])))
        return
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    print(f"q (B, H, T, D) = ({B}, {H}, {T}, {D}) fresh; k ({B}, {G}, {T}, {D}) fresh; "
          "v a view into a fused output of the given row stride; is_causal, enable_gqa")
    print("max abs error against the float32 math backend: forward / grad of V "
          "(a correct bf16 result is about 1e-2)")
    header = f"{'V layout':44}" + "".join(f"{name:>20}" for name in BACKENDS)
    print(header)
    wrong = []
    for case in CASES:
        cells = []
        for backend in BACKENDS:
            done = subprocess.run([sys.executable, __file__, case, backend], capture_output=True,
                                  text=True)
            try:
                result = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                result = {"error": (done.stderr.strip().splitlines() or ["crashed"])[-1][:80]}
            if "error" in result:
                cells.append("error")
                wrong.append(f"{case}, {backend}: raised {result['error']}")
            else:
                cells.append(f"{result['forward']:.3g} / {result['grad_v']:.3g}")
                if result["forward"] > 0.1 or result["grad_v"] > 1.0:
                    wrong.append(f"{case}, {backend}: WRONG, no error raised "
                                 f"(forward {result['forward']:.3g}, grad {result['grad_v']:.3g})")
        print(f"{case:44}" + "".join(f"{cell:>20}" for cell in cells), flush=True)
    print("\n".join(["", "defects:"] + wrong) if wrong else "\nno defect: every backend agrees")


if __name__ == "__main__":
    main()
