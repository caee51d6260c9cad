"""The language-model loss of the decoder's last hidden states, by one of two kernels
(`train.fused_loss`):

- "none" (the default): the LM head's logits, cast to float32, and PyTorch's cross-entropy.
  Under torch.compile the head and the loss are one graph, so the float32 logits of the
  16k vocabulary are not written out whole (lab/model/decoder.py).
- "liger": Liger Kernel's fused linear cross-entropy (liger-kernel, Triton, CUDA only;
  `pip install 'gated-attention-lab[fused]'`). It takes the hidden states and the head's
  weight and works through the tokens in chunks, computing the gradients of each chunk
  in the forward pass, so no whole logits tensor exists in either pass: one of the
  memory-bound costs of a step that issue "Grid cells at the GPU's full speed" asks to fuse
  (benchmarks/README.md, the `base` profile). Its forward reads the count of targets with
  `.item()`, a host sync that Dynamo cannot trace, so it runs outside the compiled graph
  (`torch.compiler.disable`): one graph break, at the very end of the forward.

Both give the mean (or sum) over tokens of -log softmax(h W^T)[target]; tests/unit/test_loss.py
compares "liger" with "none" in float32 and bf16 on a GPU. Whether it is faster is measured
by `gatelab bench --set train.fused_loss=liger` (benchmarks/README.md), not assumed: on one
H100 (2026-12-06, the bare loop) it was not, 0.886x of "none" at `small` (with 25% less
memory) and 1.00x at `medium`, where the compiled "none" already keeps the logits in one
graph; so "none" stays the default.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lab.errors import LabError


def require(kernel: str, cuda: bool) -> None:
    """Fail before training where `kernel` cannot run here, with what to do about it."""
    if kernel == "none":
        return
    if not cuda:
        raise LabError(f"train.fused_loss={kernel}: Liger Kernel's fused cross-entropy is a "
                       "Triton kernel and needs a CUDA GPU; use train.fused_loss=none here")
    try:
        _liger()
    except ImportError as err:
        raise LabError(f"train.fused_loss={kernel}: liger-kernel is not importable here ({err}); "
                       "pip install 'gated-attention-lab[fused]'") from None


@functools.cache
def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return torch.compiler.disable(liger_fused_linear_cross_entropy)


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            reduction: str, kernel: str = "none") -> torch.Tensor:
    """Cross-entropy of `hidden` (B, T, C) through the head `weight` (vocab, C) against
    `targets` (B, T): the mean over tokens, or with reduction "sum" their sum."""
    if kernel == "none":
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                               reduction=reduction)
    # Liger's chunked matmul (torch.mm with out=) is outside autocast's reach and needs one
    # dtype: the operands are cast as autocast casts the "none" path's head (bf16 under
    # bf16-mixed), and the head's gradient is summed over the chunks in float32.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") \
        else hidden.dtype
    return _liger()(hidden.flatten(0, 1).to(dtype), weight.to(dtype), targets.flatten(),
                    reduction=reduction, accum_dtype=torch.float32)
