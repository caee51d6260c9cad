"""A run's corpus, opened without Lightning: a grid's own process plans its cells on it
(lab/experiments/grid/spec.py) before the workers that train them import Lightning
(lab/training/step.py says why that matters)."""

from __future__ import annotations

from lab.config import RunConfig, with_vocab
from lab.data.sources import open_source
from lab.data.store import TokenStore
from lab.data.windows import check_batch_fits
from lab.training.schedule import total_steps


def open_data(config: RunConfig) -> tuple[TokenStore, RunConfig]:
    """The run's token store, checked to hold the windows the run will draw, and the config
    with the store's vocabulary size."""
    d = config.data
    store = open_source(d.source, d.vocab_size, d.valid, d.test)
    check_batch_fits(store, config.model.context, config.train.micro_batch, d.bos_aligned,
                     total_steps(config) * config.train.batch_size)
    return store, with_vocab(config, store.vocab_size)
