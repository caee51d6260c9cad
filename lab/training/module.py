"""The Lightning side: the language-model module and the token data module.

The module owns the model and the step logic (loss, optimizer, schedule, clipping), built
from the Lightning-free pieces the bench's bare loop shares (lab/training/step.py);
cross-cutting concerns (loss history, spikes, divergence, throughput, checkpoints, probes)
live in callbacks (lab/training/callbacks.py); the Trainer runs the loop.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lab.config import RunConfig
from lab.data.store import TokenStore
from lab.data.windows import WindowSampler, eval_windows
from lab.model.decoder import Decoder
from lab.progress import configure_output
from lab.training.schedule import accumulation, lr_lambda, total_steps, warmup_steps
from lab.training.step import (adamw, begin_cudagraph_step, compile_for_training, step_loss,
                               train_sampler, uses_cudagraphs)

configure_output()  # Lightning set its loggers to INFO when imported (lab/progress.py)


class LanguageModel(L.LightningModule):
    def __init__(self, config: RunConfig):
        super().__init__()
        self.config = config
        self.save_hyperparameters({"config": config.to_dict()})
        self.model = Decoder(config.model)
        self.model.loss_kernel = config.train.fused_loss
        self.max_steps = total_steps(config)
        self._eval_sums: dict[str, list[torch.Tensor]] = {}
        self._cudagraphs = False  # set in setup, where the device is known

    def setup(self, stage: str) -> None:
        # Before the Trainer moves the module, so the device is read from the machine, as
        # lab/training/run.py chooses the accelerator.
        if self.config.train.compile_on(torch.cuda.is_available()) and \
                not getattr(self, "_compiled", False):
            # Dynamo's caches start empty unless this process's last model was of the same
            # compile shape (lab/training/step.py compile_for_training: the recompile limit).
            compile_for_training(self.model, self.config)
            self._compiled = True
            self._cudagraphs = uses_cudagraphs(self.config.train, torch.cuda.is_available())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _lm_loss(self, batch, reduction: str = "mean") -> torch.Tensor:
        inputs, targets = batch
        return self.model(inputs, targets=targets, reduction=reduction)

    def training_step(self, batch, batch_idx):
        begin_cudagraph_step(self._cudagraphs)
        loss, lm_loss, aux_losses = step_loss(self.model, *batch)
        for name, value in aux_losses.items():
            self.log(f"train/{name}", value)
        # train/loss, train/grad_norm and lr are logged by LossMonitor once per interval, not
        # here: Lightning's self.log costs host time every step (a small model's step is a
        # few milliseconds of GPU work), and a float (the learning rate) becomes a CUDA
        # tensor through a blocking copy, a host-device sync every step.
        # Under CUDA graphs the loss is a graph output, overwritten by the next replay, and
        # LossMonitor keeps it for up to log_every steps: a copy (one scalar) is kept instead.
        lm_loss = lm_loss.detach()
        return {"loss": loss, "lm_loss": lm_loss.clone() if self._cudagraphs else lm_loss}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Clipping here rather than through the Trainer, so the pre-clip norm is logged.
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.config.train.grad_clip)
        self.grad_norm = norm.detach()

    def _eval_step(self, batch, split: str):
        windows = batch[0] if isinstance(batch, (list, tuple)) else batch
        inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if getattr(self, "_compiled", False):
            # The training step's own compiled graph (same call, grad mode and layouts), not
            # a second compilation for evaluation: that took ~10 s at `small`, as long as a
            # short run's training (benchmarks/README.md). The activations it saves are freed
            # at once; the Trainer runs evaluation under no_grad, not inference_mode, for this.
            # Train mode too, which torch.compile guards on: the decoder has no dropout, and
            # what MoE layers record in train mode (router losses, counts) is not read here.
            was_training = self.model.training
            self.model.train()
            begin_cudagraph_step(self._cudagraphs)
            try:
                with torch.enable_grad():
                    losses = self.model(inputs, targets=targets).detach() * targets.numel()
            finally:
                self.model.train(was_training)
        else:
            losses = self._lm_loss((inputs, targets), reduction="sum")
        sums = self._eval_sums.setdefault(split, [torch.zeros((), device=self.device),
                                                  torch.zeros((), device=self.device)])
        sums[0] += losses.float()
        sums[1] += windows[:, 1:].numel()

    def _eval_end(self, split: str):
        total, count = self._eval_sums.pop(split)
        total = self.all_gather(total).sum()
        count = self.all_gather(count).sum()
        loss = total / count
        self.log(f"{split}/loss", loss, sync_dist=False, rank_zero_only=True)
        self.log(f"{split}/ppl", torch.exp(loss), sync_dist=False, rank_zero_only=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        if "val" in self._eval_sums:
            self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        if "test" in self._eval_sums:
            self._eval_end("test")

    def configure_optimizers(self):
        t = self.config.train
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        optimizer = adamw(self.named_parameters(), self.config, fused)
        warmup = warmup_steps(self.max_steps, t.warmup_fraction)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, self.max_steps, warmup, t.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def graph_trainer_options(config: RunConfig, cuda: bool) -> dict:
    """The Trainer's arguments that decide the graphs a compiled run traces (its precision's
    autocast, its micro-batches per step, deterministic kernels, evaluation's grad mode): one
    place for train_run and the grid's compile-ahead process (lab/experiments/grid/ahead.py),
    whose cached graphs a cell finds only where both pass the same."""
    return {"precision": config.train.precision_on(cuda),
            "accumulate_grad_batches": accumulation(config),
            "deterministic": config.train.deterministic,
            # a compiled run evaluates through its training graph (_eval_step)
            "inference_mode": not config.train.compile_on(cuda)}


class _TrainBatches(IterableDataset):
    """Micro-batches start, start+1, ... of this rank, split over loader workers in order
    (the DataLoader takes one batch from each worker in turn, so order is preserved)."""

    def __init__(self, sampler: WindowSampler, start: int, rank: int, world: int):
        self.sampler, self.start, self.rank, self.world = sampler, start, rank, world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while True:
            yield self.sampler.batch(index * self.world + self.rank)
            index += workers


class TokenDataModule(L.LightningDataModule):
    def __init__(self, store: TokenStore, config: RunConfig, start_step: int = 0,
                 num_workers: int = 0):
        super().__init__()
        self.store, self.config = store, config
        self.start_step, self.num_workers = start_step, num_workers

    def train_dataloader(self):
        sampler = train_sampler(self.store, self.config)
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        start = self.start_step * accumulation(self.config)
        return DataLoader(_TrainBatches(sampler, start, rank, world), batch_size=None,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str):
        t = self.config.train
        windows = eval_windows(self.store, split, self.config.model.context,
                               t.val_batches * t.micro_batch, self.config.data.bos_aligned,
                               self.config.data.bos_prefix)
        # Whole micro-batches only (when there is one): a last, shorter batch has another
        # shape, which a compiled model recompiles for, dynamic in the batch dimension; at
        # `small` that cost 10-14 s inside the first validation (a 2-window remainder of the
        # synthetic split; benchmarks/README.md, "Graph breaks and recompiles"), and the
        # training steps after it could run the dynamic graph. Eager runs evaluate the same
        # windows, so compiled and eager runs report comparable losses.
        return DataLoader(windows, batch_size=t.micro_batch, shuffle=False,
                          drop_last=len(windows) >= t.micro_batch)

    def val_dataloader(self):
        return self._eval_loader("valid")

    def test_dataloader(self):
        return self._eval_loader("test")
