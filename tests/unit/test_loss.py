"""lab/model/loss.py: the LM loss by PyTorch's cross-entropy against a float64 reference on
the CPU, the fused Liger kernel against it on a GPU, and where a kernel cannot run."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lab.errors import LabError
from lab.model.loss import lm_loss, require


def batch(vocab=97, width=24, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(2, 13, width, generator=gen).to(device, dtype)
    weight = (torch.randn(vocab, width, generator=gen) / width ** 0.5).to(device)
    targets = torch.randint(0, vocab, (2, 13), generator=gen).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def reference(hidden, weight, targets, reduction):
    """-log softmax(h W^T)[target] in float64, written out."""
    logits = hidden.double() @ weight.double().T
    picked = logits.gather(-1, targets[..., None])[..., 0]
    nll = torch.logsumexp(logits, dim=-1) - picked
    return nll.sum() if reduction == "sum" else nll.mean()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pytorch_kernel_matches_the_float64_reference(reduction):
    hidden, weight, targets = batch()
    loss = lm_loss(hidden, weight, targets, reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference(hidden, weight, targets, reduction),
                               rtol=1e-6, atol=1e-6)
    loss.backward()
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    reference(h2, w2, targets, reduction).backward()
    torch.testing.assert_close(hidden.grad.double(), h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad.double(), w2.grad, rtol=1e-5, atol=1e-7)


def test_a_kernel_that_cannot_run_here_is_refused_before_training():
    require("none", cuda=False)
    with pytest.raises(LabError, match=r"train.fused_loss=liger: .* needs a CUDA GPU"):
        require("liger", cuda=False)


gpu_liger = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="Liger Kernel's fused cross-entropy needs CUDA and liger-kernel (the `fused` extra)")


@gpu_liger
@pytest.mark.parametrize("bf16", [False, True])
def test_liger_kernel_matches_pytorchs_loss_and_gradients(bf16):
    """The fused kernel against the default path on the same batch, at a 16k vocabulary
    and `small`'s width: in float32, and under bf16 autocast as training runs it, where both
    paths multiply in bf16 (tolerances: the logits' bf16 rounding)."""
    hidden, weight, targets = batch(vocab=16384, width=384, device="cuda")
    copies = [(hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_())
              for _ in range(2)]
    results = []
    for kernel, (h, w) in zip(("none", "liger"), copies):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(h, w, targets, "mean", kernel)
        loss.backward()
        results.append((loss.float(), h.grad.float(), w.grad.float()))
    (loss0, dh0, dw0), (loss1, dh1, dw1) = results
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, **tol)
    torch.testing.assert_close(dh1, dh0, **tol)
    torch.testing.assert_close(dw1, dw0, **tol)
    assert w.grad.dtype == torch.float32  # the head's gradient reaches the float32 weight
