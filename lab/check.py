"""`gatelab check`: the fast path against a float32 reference, on this machine's accelerator.

Why it exists: a published result of this lab ("the headwise gate fails at this scale") was
a silent wrong result of cuDNN attention on a misaligned view (docs/results.md, the withdrawn
section); nothing compared the fast GPU path with a reference. For each variant this runs one
forward and backward of the production path (the configured precision, eager and, where the
run would compile, compiled, with whatever SDPA backend PyTorch picks) and the same step of
a float32 eager reference with the same weights and batch whose attention is the explicit
softmax of lab/model/decoder.py (`Decoder.set_reference_attention`), so a wrong fused kernel cannot
hide on both sides. Matmuls of the reference run in full float32 (TF32 off).

What is compared, each as ||fast - reference|| / ||reference|| (a norm-wise relative error,
stable where elementwise ratios of near-zero values are not): the logits, the loss, and the
gradient of every parameter (the worst one is reported by name).

Choices where nothing else decides (all options of the command):
- Weights are drawn for the check, not the training init: every matrix from N(0, 1/fan_in),
  norm weights 1 + N(0, 0.2^2), other vectors N(0, 0.2^2). At the training init (std 0.02)
  gate logits are near 0, so every gate sits near 0.5 and a permuted or misread gate would
  change the output by less than bf16 rounding; with unit-gain weights every path carries
  signal.
- The model keeps the preset's widths, heads and context (what decides tensor layouts and
  kernel choice) but `layers` layers (default 2): every layer runs the same code on the same
  shapes, and compiling the full depth for ~35 variants would take minutes.
- Tolerances (TOLERANCES) are set from the spread measured on the GPU machine
  (benchmarks/README.md, "gatelab check") with a wide margin: the layout defect gave relative
  errors of order 1, bf16 rounding gives about 1e-2.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from lab.config import resolve
from lab.data.store import cache_root
from lab.errors import LabError
from lab.model.decoder import Decoder, SwitchProjection
from lab.model.moe import MoEFeedForward
from lab.model.variants import VARIANTS
from lab.training.step import compile_model
from lab.training.preflight import preflight

# Allowed relative error per training precision: (logits, loss, gradients).
TOLERANCES = {"bf16-mixed": (3e-2, 2e-2, 1e-1), "16-mixed": (3e-2, 2e-2, 1e-1),
              "32-true": (1e-3, 1e-3, 1e-2)}

# The aten operators behind F.scaled_dot_product_attention, as the profiler names them,
# most specific first (the CPU flash kernel's name contains the CUDA one's).
SDPA_BACKENDS = [("_scaled_dot_product_flash_attention_for_cpu", "flash-cpu"),
                 ("_scaled_dot_product_cudnn_attention", "cudnn"),
                 ("_scaled_dot_product_flash_attention", "flash"),
                 ("_scaled_dot_product_efficient_attention", "efficient"),
                 ("_scaled_dot_product_attention_math", "math")]


@dataclass
class CheckRow:
    variant: str
    mode: str                   # eager or compiled
    backend: str                # the SDPA backend PyTorch ran
    logits: float               # relative errors
    loss: float
    grads: float
    worst_grad: str             # the parameter whose gradient is furthest off
    seconds: float
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class CheckReport:
    device: str
    precision: str
    accelerator: bool
    rows: list[CheckRow]
    skipped: dict[str, str]     # variant -> why it was not checked

    @property
    def failures(self) -> list[str]:
        return [f for row in self.rows for f in row.failures]


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    """||fast - reference|| / ||reference|| in float64; inf where fast is not finite."""
    fast, reference = fast.detach().double(), reference.detach().double()
    if not torch.isfinite(fast).all():
        return math.inf
    scale = reference.norm().item()
    difference = (fast - reference).norm().item()
    return difference / scale if scale > 0 else difference


def draw_check_weights(model: nn.Module, seed: int) -> None:
    """Unit-gain weights (see the module docstring), drawn on the CPU so that every device
    gets the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.RMSNorm) and m.weight is not None}
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim >= 2:
                value = noise / math.sqrt(parameter.shape[-1])
            elif id(parameter) in norms:
                value = 1 + 0.2 * noise
            else:
                value = 0.2 * noise
            parameter.copy_(value.to(parameter.dtype))


def sdpa_backend_of(step) -> str:
    """The SDPA backend that `step()` runs, read from the profiler's operator names."""
    # The profiler's C++ side prints start/stop banners on file descriptor 2; the step ran
    # once already before this (any error of its own has shown), so that is all it hides.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    names = {event.name for event in prof.events()}
    for operator, backend in SDPA_BACKENDS:
        if any(operator in name for name in names):
            return backend
    return "none" if not any("scaled_dot_product" in name for name in names) else "other"


def _step(model, inputs, targets, autocast):
    """The training step's computation: logits (no grad), then loss and gradients."""
    for parameter in model.parameters():
        parameter.grad = None
    with torch.no_grad(), autocast():
        logits = model(inputs).float()
    with autocast():
        loss = model(inputs, targets=targets)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return logits, loss.detach().float(), grads


def _reference(model, inputs, targets):
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model.set_reference_attention(True)
        return _step(model, inputs, targets, _no_autocast)
    finally:
        model.set_reference_attention(False)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_variant(variant: str, preset: str, overrides: list[str], device: str, precision: str,
                  modes: list[str], layers: int, batch: int, seed: int,
                  tolerances: tuple[float, float, float]) -> list[CheckRow]:
    config = resolve(variant, preset, overrides)
    preflight(config, device)
    model_config = config.model
    if layers:
        model_config = dataclasses.replace(model_config, n_layers=min(layers, model_config.n_layers))
    torch.manual_seed(seed)
    reference = Decoder(model_config)
    draw_check_weights(reference, seed)
    reference = reference.to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    windows = torch.randint(model_config.vocab_size, (batch, model_config.context + 1),
                            generator=generator).to(device)
    inputs, targets = windows[:, :-1], windows[:, 1:]

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device_type=device, dtype=dtype)) if dtype else _no_autocast
    rows = []
    for mode in modes:
        started = time.perf_counter()
        fast = copy.deepcopy(reference)
        # The loss kernel training uses (train.fused_loss); the reference keeps PyTorch's.
        fast.loss_kernel = config.train.fused_loss
        if mode == "compiled":
            torch._dynamo.reset()  # each variant compiles afresh, within the recompile limit
            compile_model(fast, config.train.compile_mode)  # as training compiles it
        _step(fast, inputs, targets, autocast)  # compiles, when compiled
        backend = sdpa_backend_of(lambda: _step(fast, inputs, targets, autocast))
        routers = _routing_modules(fast)
        for module in routers:
            module.routing_record = []
        logits, loss, grads = _step(fast, inputs, targets, autocast)
        # The reference routes every token as the fast pass did (lab.model.layers.top_k_indices).
        for module, ref_module in zip(routers, _routing_modules(reference)):
            ref_module.routing_replay, module.routing_record = module.routing_record, None
        ref_logits, ref_loss, ref_grads = _reference(reference, inputs, targets)
        for ref_module in _routing_modules(reference):
            ref_module.routing_replay = None
        grad_errors = {name: relative_error(grads[name], ref) if name in grads else math.inf
                       for name, ref in ref_grads.items()}
        worst = max(grad_errors, key=grad_errors.get) if grad_errors else "-"
        row = CheckRow(variant, mode, backend, relative_error(logits, ref_logits),
                       relative_error(loss, ref_loss), grad_errors.get(worst, 0.0), worst,
                       time.perf_counter() - started)
        for tensor, error, allowed in (("logits", row.logits, tolerances[0]),
                                       ("loss", row.loss, tolerances[1]),
                                       (f"gradient of {worst}", row.grads, tolerances[2])):
            if not error <= allowed:  # also catches NaN
                kernel = "" if fast.loss_kernel == "none" else f", loss {fast.loss_kernel}"
                row.failures.append(f"{variant} {mode} (SDPA backend {backend}{kernel}): "
                                    f"{tensor} relative error {error:.3g} > tolerance {allowed:g}")
        rows.append(row)
        del fast
    return rows


def _routing_modules(model: nn.Module) -> list[nn.Module]:
    """The layers that pick experts by top-k (Switch Head projections, MoE FFNs), in order."""
    return [m for m in model.modules() if isinstance(m, (SwitchProjection, MoEFeedForward))]


def select_variants(text: str) -> list[str]:
    if text == "all":
        return list(VARIANTS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if not names or unknown:
        raise LabError(f"--variants: unknown variant(s) {', '.join(unknown) or repr(text)}; "
                       "use all or names from `gatelab variants`")
    return names


def run_check(preset: str = "small", variants: str = "all", precision: str | None = None,
              overrides: list[str] | None = None, modes: str | None = None, layers: int = 2,
              batch: int = 2, seed: int = 0, tolerance: float | None = None,
              jobs: int | None = None, log=print) -> CheckReport:
    """Check every selected variant; `log` receives each row as it is measured. `jobs`
    processes check variants side by side (default: 4 on a GPU, where compiling is most of
    the time and mostly single-threaded Python; 1 on the CPU)."""
    overrides = list(overrides or [])
    names = select_variants(variants)
    accelerator = torch.cuda.is_available()
    device = "cuda" if accelerator else "cpu"
    probe_config = resolve("baseline", preset, overrides)  # validates preset and overrides
    if precision is None:
        precision = probe_config.train.precision_on(accelerator)
    if precision not in TOLERANCES:
        raise LabError(f"--precision: {precision!r} is not one of {', '.join(TOLERANCES)}")
    if modes is None:
        modes_list = ["eager"] + (["compiled"] if probe_config.train.compile_on(accelerator) else [])
    else:
        modes_list = [m.strip() for m in modes.split(",") if m.strip()]
        bad = [m for m in modes_list if m not in ("eager", "compiled")]
        if bad or not modes_list:
            raise LabError(f"--modes: expected eager, compiled or eager,compiled, got {modes!r}")
    if layers < 0 or batch < 1:
        raise LabError(f"--layers must be >= 0 (0 = the preset's depth) and --batch >= 1, "
                       f"got {layers} and {batch}")
    tolerances = TOLERANCES[precision] if tolerance is None else (tolerance,) * 3
    jobs = jobs or (min(4, max(1, (os.cpu_count() or 1) // 4)) if accelerator else 1)
    if jobs < 1:
        raise LabError(f"--jobs: must be at least 1, got {jobs}")
    skipped: dict[str, str] = {}
    checked = []
    for name in names:
        try:
            resolve(name, preset, overrides)
            checked.append(name)
        except LabError as err:  # e.g. an MoE-only variant at a dense preset
            skipped[name] = str(err)
    arguments = [(name, preset, overrides, device, precision, modes_list, layers, batch, seed,
                  tolerances) for name in checked]
    rows: list[CheckRow] = []
    log(HEADER)
    if jobs == 1 or len(checked) < 2:
        results = (check_variant(*args) for args in arguments)
    else:
        # spawn: each worker starts its own CUDA context (a forked one cannot)
        pool = ProcessPoolExecutor(min(jobs, len(checked)),
                                   mp_context=multiprocessing.get_context("spawn"))
        results = (future.result() for future in
                   as_completed([pool.submit(check_variant, *args) for args in arguments]))
    try:
        for variant_rows in results:
            for row in variant_rows:
                rows.append(row)
                log(format_row(row))
    finally:
        if jobs > 1 and len(checked) >= 2:
            pool.shutdown(cancel_futures=True)
    rows.sort(key=lambda row: (checked.index(row.variant), row.mode))
    name = torch.cuda.get_device_name() if accelerator else "cpu"
    return CheckReport(name, precision, accelerator, rows, skipped)


HEADER = (f"{'variant':44} {'mode':8} {'backend':9} {'logits':>9} {'loss':>9} {'grads':>9}  "
          "worst gradient")


def format_row(row: CheckRow) -> str:
    mark = "ok" if row.ok else "FAIL"
    return (f"{row.variant:44} {row.mode:8} {row.backend:9} {row.logits:9.2e} {row.loss:9.2e} "
            f"{row.grads:9.2e}  {row.worst_grad} [{mark}, {row.seconds:.1f} s]")


def describe(report: CheckReport) -> str:
    lines = [f"checked {len({r.variant for r in report.rows})} variant(s) on {report.device}, "
             f"precision {report.precision}, against a float32 explicit-softmax reference"]
    if not report.accelerator:
        lines.append("no accelerator was checked: CUDA is not available here, so this compared "
                     "the CPU fast path (float32 SDPA) only")
    for name, why in report.skipped.items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


# What a pass vouches for: the code that builds, trains and checks a model (a change to any of
# these files is a change the check may have to catch), relative to the lab package. The
# presets are in it: a pass is keyed by the preset's name, and the shapes are in presets.py.
CHECKED_CODE = ("model/*.py", "training/*.py", "check.py", "config.py", "presets.py")


def code_hash() -> str:
    """sha256 of the contents of CHECKED_CODE's files, in a stable order (16 hex digits)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for pattern in CHECKED_CODE for p in root.glob(pattern)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def accelerator_identity() -> str:
    """The device the check runs on (GPU 0 of this process's view) and the library versions
    whose kernels it runs: the defect it exists for was one cuDNN version's. Device
    properties and the cuDNN version need no CUDA context on the device (the grid reads the
    GPU's memory the same way before it starts its workers, lab/experiments/grid/estimate.py
    gpu_memory_gib)."""
    return (f"{torch.cuda.get_device_properties(0).name}; torch {torch.__version__}; "
            f"CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}")


def passed_path(preset: str, variant: str, overrides: list[str], device: str, code: str) -> Path:
    """Where the pass of one variant's check is kept (the lab's cache, `checks/`): the name
    hashes the code, the device and versions, the preset, the overrides and the variant."""
    key = hashlib.sha256("\0".join([code, device, preset, *sorted(overrides), "|", variant])
                         .encode()).hexdigest()[:24]
    return cache_root() / "checks" / f"{variant}-{key}.txt"


def _variant_rows(table: str, variant: str) -> list[str]:
    """The rows of `gatelab check`'s table that are this variant's (format_row)."""
    return [line for line in table.splitlines() if line.split(maxsplit=1)[:1] == [variant]]


def check_before_training(preset: str, variants: list[str], overrides: list[str],
                          quiet: bool = False, log=print, force: bool = False) -> str | None:
    """The grid's and the sweep's guard: on a GPU machine, `gatelab check` of their variants
    at their preset and overrides before the first cell; LabError (one `error:` line, nothing
    started) when it fails. Without CUDA it does nothing (None): the CPU fast path is what the
    test suite checks. Returns the check's table, which the caller keeps on its parent run
    (`check.txt`) beside the results it vouches for.

    A variant that passed before on the same code (code_hash), device and library versions
    (accelerator_identity), preset and overrides is not checked again: its pass is a file in
    the lab's cache (passed_path) holding its rows, which go into the returned table. `force`
    checks every variant anyway (`--check`). A grid's second start on one machine so skips a
    check that took 51 s for three variants (issue "Time to a verdict")."""
    if not torch.cuda.is_available():
        return None
    device, code = accelerator_identity(), code_hash()
    paths = {v: passed_path(preset, v, overrides, device, code) for v in variants}
    passed = {v: path for v, path in paths.items() if path.exists() and not force}
    to_check = [v for v in variants if v not in passed]
    earlier = "".join(passed[v].read_text() for v in variants if v in passed)
    if passed and not quiet:
        log(f"check: {len(passed)} variant(s) passed before on this code ({code}) and device "
            f"({device}), not checked again (--check forces it)")
    if not to_check:
        return f"passed before on code {code}, {device}:\n{earlier}"
    table = _run_check(preset, to_check, overrides, quiet, log)
    for variant in to_check:
        path = paths[variant]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{row}\n" for row in _variant_rows(table, variant)))
        os.replace(tmp, path)  # a pass is recorded whole or not at all
    return table + (f"\npassed before on code {code}, {device}:\n{earlier}" if earlier else "")


def _run_check(preset: str, variants: list[str], overrides: list[str], quiet: bool,
               log) -> str:
    """`gatelab check` in a child process, so that this process, which starts the GPU
    workers, never initialises CUDA itself; its table, or LabError naming what failed."""
    command = [sys.executable, "-m", "lab", "check", "--preset", preset,
               "--variants", ",".join(variants)]
    for pair in overrides:
        command += ["--set", pair]
    if not quiet:
        log(f"checking the fast path of {len(variants)} variant(s) against the float32 "
            "reference (gatelab check; --no-check skips it)")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        failures = [line.removeprefix("check failed: ") for line in result.stderr.splitlines()
                    if line.startswith("check failed: ")]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        why = failures[0] if failures else (errors[0].removeprefix("error: ") if errors else
                                            (result.stderr.strip().splitlines() or ["?"])[-1])
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise LabError(f"check failed, nothing started: {why}{more}; see `{' '.join(command[1:])}`"
                       " or skip with --no-check")
    if not quiet:
        log(f"check passed in {time.perf_counter() - started:.0f} s")
    return result.stdout
