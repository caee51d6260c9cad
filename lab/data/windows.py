"""The windows training and evaluation read from a token store (lab/data/store.py).

Every batch is a pure function of (seed, micro-batch index): the same seed gives the same
batches for every variant, and a resumed run continues at its step with no loader state.
"""

from __future__ import annotations

import numpy as np
import torch

from lab.data.store import SPLITS, TokenStore
from lab.errors import LabError


# --- windows -------------------------------------------------------------------------------

def aligned_starts(store: TokenStore, split: str, seq_len: int) -> np.ndarray:
    """Document starts (end-of-text positions) with room for a window of seq_len + 1 after them."""
    starts = store.document_starts(split)
    return starts[starts + seq_len + 1 <= len(store.tokens(split))]


# Document-start alignment draws from one window per document; past this many draws per
# distinct window a run memorises them (seen on Gutenberg: 291 books, 300 steps x 32
# windows, train loss 3.1 while validation loss rose). data.bos_prefix is the fix there.
MAX_DRAWS_PER_ALIGNED_WINDOW = 4


def check_batch_fits(store: TokenStore, seq_len: int, micro_batch: int,
                     bos_aligned: bool = False, train_windows: int = 0) -> None:
    """Before training (and before any run is recorded): each split must hold at least one
    micro-batch of windows of seq_len + 1 tokens, and BOS-aligned training enough document
    starts for the `train_windows` the run will draw."""
    need = micro_batch * (seq_len + 1)
    for split in SPLITS:
        have = int(store.manifest["splits"][split])
        if have < need:
            raise LabError(f"data: the {split} split of {store.path} has {have:,} tokens, fewer "
                           f"than one micro-batch ({micro_batch} windows of {seq_len + 1} = "
                           f"{need:,}); use more text, a smaller model.context or "
                           "train.micro_batch_size")
    if not bos_aligned:
        return
    starts = len(aligned_starts(store, "train", seq_len))
    if starts == 0:
        raise LabError(f"data.bos_aligned: no document in the train split of {store.path} has "
                       f"room for a window of {seq_len + 1} tokens; set data.bos_aligned=false")
    if train_windows > MAX_DRAWS_PER_ALIGNED_WINDOW * starts:
        raise LabError(f"data.bos_aligned: the train split has {starts:,} document starts but the "
                       f"run draws {train_windows:,} windows (each would be seen "
                       f"{train_windows / starts:.0f} times and memorised); use "
                       "data.bos_prefix=true (random windows with BOS at position 0) instead")


def _windows(tokens: np.ndarray, offsets, seq_len: int, bos_id: int | None) -> torch.Tensor:
    """(n, seq_len + 1) windows at `offsets`; with `bos_id`, BOS then seq_len tokens."""
    if bos_id is None:
        rows = [tokens[o:o + seq_len + 1] for o in offsets]
    else:
        rows = [np.concatenate(([bos_id], tokens[o:o + seq_len])) for o in offsets]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


class WindowSampler:
    """Random training windows of `seq_len + 1` tokens, a pure function of (seed, index).

    Position 0 means what it does in the paper's models (the attention-sink analysis reads
    it) in one of two ways:
    - `bos_aligned`: every window starts at a document's end-of-text token; right for corpora
      of many short documents, wrong for a few long ones (see check_batch_fits);
    - `bos_prefix`: a random window whose first token is replaced by BOS, i.e. BOS followed
      by seq_len tokens from anywhere; every window is distinct as with random windows.
    """

    def __init__(self, store: TokenStore, seq_len: int, micro_batch: int, seed: int,
                 bos_aligned: bool = False, split: str = "train", bos_prefix: bool = False):
        self.tokens = store.tokens(split)
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.bos_id = store.eos_id if bos_prefix else None
        if len(self.tokens) < seq_len + 2:
            raise LabError(f"data: the {split} split has {len(self.tokens)} tokens, fewer than one "
                           f"window of {seq_len + 1}; use more text or a shorter context")
        self.starts = None
        if bos_aligned:
            self.starts = aligned_starts(store, split, seq_len)
            if len(self.starts) == 0:
                raise LabError(f"data: no document in the {split} split has room for a "
                               f"BOS-aligned window of {seq_len + 1} tokens")

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        if self.starts is None:
            offsets = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.micro_batch)
        else:
            offsets = self.starts[rng.integers(0, len(self.starts), size=self.micro_batch)]
        windows = _windows(self.tokens, offsets, self.seq_len, self.bos_id)
        # Contiguous, as evaluation's are (lab/training/module.py _eval_step) and as a copy to
        # the GPU makes them: a compiled model guards on strides, and on the CPU the views'
        # (seq_len + 1, 1) made the first validation trace and compile its graph again.
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_windows(store: TokenStore, split: str, seq_len: int, n_windows: int,
                 bos_aligned: bool = False, bos_prefix: bool = False) -> torch.Tensor:
    """A fixed evaluation set: windows spread evenly over the split, (n, seq_len + 1);
    `bos_aligned` and `bos_prefix` as in WindowSampler."""
    tokens = store.tokens(split)
    if len(tokens) < seq_len + 2:
        raise LabError(f"data: the {split} split has {len(tokens)} tokens, fewer than one "
                       f"window of {seq_len + 1}")
    if bos_aligned:
        candidates = aligned_starts(store, split, seq_len)
        if len(candidates) == 0:
            candidates = np.array([0])
    else:
        candidates = np.arange(0, len(tokens) - seq_len - 1, max(1, seq_len // 2))
    picks = candidates[np.linspace(0, len(candidates) - 1, num=min(n_windows, len(candidates)))
                       .round().astype(int)]
    return _windows(tokens, picks, seq_len, store.eos_id if bos_prefix and not bos_aligned else None)
