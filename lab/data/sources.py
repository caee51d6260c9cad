"""Where a run's tokens come from: `synthetic`, a prepared store, or a text source that is
prepared into the cache on first use (lab/data/corpus.py)."""

from __future__ import annotations

from pathlib import Path

from lab.data.corpus import prepare
from lab.data.store import MANIFEST, TokenStore, prepare_synthetic


def open_source(source: str, vocab_size: int, valid: str | None = None,
                test: str | None = None) -> TokenStore:
    """`synthetic`, a prepared directory, or a text source (files, globs, `hf:`; see
    lab/data/documents.py), which is prepared into the cache on first use."""
    if source == "synthetic":
        return prepare_synthetic(vocab_size)
    if Path(source).is_dir() and (Path(source) / MANIFEST).exists():
        return TokenStore.open(source)
    return prepare(source, vocab_size, valid, test).store
