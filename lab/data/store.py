"""The on-disk token store: its format, reading and writing it, and the synthetic corpus.

A prepared corpus is a directory: `manifest.json` (source, tokenizer hash, vocabulary,
dtype, token counts per split, end-of-text id) and one flat token file per split
(`train.bin`, `valid.bin`, `test.bin`, uint16 or uint32), read through numpy memmaps,
as nanoGPT does. Documents are separated by the end-of-text token, which doubles as BOS.
Text sources (files, globs, Hugging Face datasets: lab/data/documents.py) are tokenized into
a store by lab/data/corpus.py (`gatelab prepare`); the windows training reads: lab/data/windows.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from lab.errors import LabError

SPLITS = ("train", "valid", "test")
END_OF_TEXT = "<|endoftext|>"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# The ids a store can hold: uint16 files up to 2^16 ids, uint32 beyond (write_store).
MAX_STORE_VOCAB = 2 ** 32


def store_dtype(vocab_size: int):
    """The token files' dtype for a vocabulary (what write_store writes, and open requires)."""
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def _manifest_int(where: str, key: str, value, low: int, high: int | None) -> int:
    """An integer field of the manifest (not a bool, not 2.5, not a string), in range."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or \
            high is not None and value > high:
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise LabError(f"{where}: {key}: expected an integer {bounds}, got {value!r} (corrupt "
                       "manifest); prepare the corpus again")
    return value


def cache_root() -> Path:
    return Path(os.environ.get("GATELAB_CACHE", "cache")).resolve()


# --- the token store ------------------------------------------------------------------

@dataclass
class TokenStore:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "TokenStore":
        """The store at `path`, its manifest checked against the token files themselves
        (check_manifest): a manifest that misdescribes its data is refused here, before any
        run exists, rather than read as other tokens."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise LabError(f"data: {path} is not a prepared corpus (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, OSError) as err:  # bad JSON, not UTF-8, unreadable
            raise LabError(f"data: corrupt manifest {manifest_path}: {err}") from None
        store = cls(path, manifest)
        store.check_manifest()
        return store

    def check_manifest(self) -> None:
        """Every field of the manifest against what write_store writes and against the token
        files: the dtype is the one write_store picks for the vocabulary (uint16 up to 2^16
        ids, else uint32; so float16 or int8 over uint16 data is refused, not cast), each
        split's file holds exactly its count of tokens of that itemsize, eos_id lies in the
        vocabulary, and the largest id in the files (read through a memmap: about 0.03 s
        for the 40M-token Gutenberg corpus warm, docs/data.md) equals `max_token_id` and
        lies below `vocab_size`. A field of the wrong type or out of range is one LabError
        naming it; nothing is allocated from the manifest's numbers before they pass."""
        where = f"data: manifest {self.path / MANIFEST}"
        m = self.manifest
        if not isinstance(m, dict):
            raise LabError(f"{where}: expected a JSON object, got {type(m).__name__}; prepare "
                           "the corpus again")
        for key in ("dtype", "splits", "vocab_size", "eos_id"):
            if key not in m:
                raise LabError(f"{where}: missing field {key!r} (corrupt manifest); prepare the "
                               "corpus again")
        vocab_size = _manifest_int(where, "vocab_size", m["vocab_size"], 1, MAX_STORE_VOCAB)
        dtype = store_dtype(vocab_size)
        if m["dtype"] != np.dtype(dtype).name:
            raise LabError(f"{where}: dtype {m['dtype']!r} does not describe these tokens: a "
                           f"vocabulary of {vocab_size} is stored as {np.dtype(dtype).name} "
                           "(lab/data/store.py write_store); prepare the corpus again")
        _manifest_int(where, "eos_id", m["eos_id"], 0, vocab_size - 1)
        splits = m["splits"]
        if not isinstance(splits, dict) or set(SPLITS) - set(splits):
            raise LabError(f"{where}: splits: expected the token counts of "
                           f"{', '.join(SPLITS)}, got {splits!r} (corrupt manifest)")
        itemsize = np.dtype(dtype).itemsize
        for split in SPLITS:
            count = _manifest_int(where, f"splits.{split}", splits[split], 0, None)
            file = self.path / f"{split}.bin"
            size = file.stat().st_size if file.is_file() else None
            if size != count * itemsize:
                found = "missing" if size is None else f"{size} bytes"
                raise LabError(f"data: {file} is missing or truncated (expected {count} tokens "
                               f"x {itemsize} bytes = {count * itemsize} bytes, found {found}); "
                               "prepare the corpus again")
        largest = self.scan_max_token_id()
        if largest >= vocab_size:
            # The model's vocabulary is the manifest's (lab.config.with_vocab): an id at or
            # past it would index past the embedding in the middle of a recorded run.
            raise LabError(f"data: {self.path} holds token id {largest}, outside its vocabulary "
                           f"of {vocab_size} (manifest vocab_size: ids must lie in [0, "
                           f"{vocab_size - 1}]); prepare the corpus again with its tokenizer")
        if "max_token_id" in m and m["max_token_id"] != largest:
            raise LabError(f"{where}: max_token_id {m['max_token_id']!r}, but the largest id in "
                           f"the token files is {largest}: the manifest does not describe "
                           "these files; prepare the corpus again")

    def scan_max_token_id(self) -> int:
        """The largest id in the token files, read (numpy's max over a memmap)."""
        return max((int(self.tokens(split).max()) for split in SPLITS
                    if int(self.manifest["splits"][split])), default=0)

    def max_token_id(self) -> int:
        """The largest id in any split: from the manifest (written since it records
        `max_token_id`, and checked against the files at open), else read from the files."""
        if "max_token_id" in self.manifest:
            return int(self.manifest["max_token_id"])
        return self.scan_max_token_id()

    @property
    def fingerprint(self) -> str:
        """The corpus's identity, 16 hex digits: a prepared text corpus's `key` (its splits'
        sources, tokenizer and format: lab/data/corpus.py prepare, the key of its cache
        folder); for a store without one (the synthetic corpus), a digest of what its
        manifest says it holds (source, tokenizer, vocabulary, dtype, tokens per split).
        Two stores of one fingerprint hold the same tokens."""
        if "key" in self.manifest:
            return str(self.manifest["key"])
        identity = {k: self.manifest.get(k) for k in ("format_version", "source", "tokenizer_hash",
                                                      "vocab_size", "dtype", "splits")}
        text = json.dumps(identity, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.path / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")

    def document_starts(self, split: str) -> np.ndarray:
        """Positions of the end-of-text tokens that open each document (a window starting
        there has BOS at position 0)."""
        tokens = self.tokens(split)
        starts = np.flatnonzero(np.asarray(tokens) == self.eos_id)
        return starts


def write_store(path: Path, splits: dict[str, np.ndarray | Iterable[np.ndarray]], vocab_size: int,
                eos_id: int, source: str, tokenizer_hash: str, extra: dict | None = None) -> TokenStore:
    """Write each split (one array, or chunks written as they come, so a large corpus never
    sits in memory) and then the manifest; a store without its manifest is never opened."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = store_dtype(vocab_size)
    counts, max_id = {}, 0
    for split, chunks in splits.items():
        # One temporary name per process: several runs may prepare the same cache at once.
        tmp = path / f"{split}.bin.tmp-{os.getpid()}"
        counts[split] = 0
        with open(tmp, "wb") as handle:
            for chunk in ([chunks] if isinstance(chunks, np.ndarray) else chunks):
                raw = np.asarray(chunk)
                # The id as given: one past uint16 would wrap around in the file.
                max_id = max(max_id, int(raw.max())) if len(raw) else max_id
                raw.astype(dtype, copy=False).tofile(handle)
                counts[split] += len(raw)
        os.replace(tmp, path / f"{split}.bin")
    manifest = dict(format_version=FORMAT_VERSION, source=source, tokenizer_hash=tokenizer_hash,
                    vocab_size=int(vocab_size), dtype=np.dtype(dtype).name, eos_id=int(eos_id),
                    bos_id=int(eos_id), splits=counts, max_token_id=max_id, **(extra or {}))
    tmp = path / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path / MANIFEST)
    return TokenStore(path, manifest)


# --- synthetic: a generated language that needs no files ----------------------------------

def generate_synthetic(vocab_size: int, n_tokens: int, seed: int, language_seed: int = 0) -> np.ndarray:
    """Documents from a sparse Markov chain with copy spans.

    Token 0 is end-of-text. Each token has 4 likely successors (probabilities .5/.25/.15/.1),
    which gives local structure; with probability 0.08 per position a document starts to
    copy a span of 8-24 tokens from earlier in itself, which only attention over long ranges
    can predict (induction). Uniform loss is ln(vocab); the chain's entropy is ~1.2 nats.
    """
    content = np.arange(1, vocab_size)
    # The language (who follows whom) is fixed by language_seed; splits differ only in `seed`.
    successors = np.random.default_rng(language_seed).choice(content, size=(vocab_size, 4))
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum([0.5, 0.25, 0.15, 0.1])
    n_docs = max(1, n_tokens // 200)
    max_len = 512
    lengths = rng.integers(64, max_len, size=n_docs)
    docs = np.zeros((n_docs, max_len), dtype=np.int64)
    docs[:, 0] = rng.choice(content, size=n_docs)
    copy_left = np.zeros(n_docs, dtype=np.int64)
    copy_src = np.zeros(n_docs, dtype=np.int64)
    rows = np.arange(n_docs)
    for t in range(1, max_len):
        start_copy = (copy_left == 0) & (rng.random(n_docs) < 0.08) & (t > 32)
        copy_left[start_copy] = rng.integers(8, 25, size=start_copy.sum())
        copy_src[start_copy] = rng.integers(0, t - 8, size=start_copy.sum())
        markov = successors[docs[:, t - 1], np.searchsorted(cumulative, rng.random(n_docs))]
        copying = copy_left > 0
        copied = docs[rows, np.minimum(copy_src, t - 1)]
        docs[:, t] = np.where(copying, copied, markov)
        copy_src += copying
        copy_left -= copying
    pieces = []
    for doc, length in zip(docs, lengths):
        pieces.append(np.zeros(1, dtype=np.int64))  # end-of-text opens each document
        pieces.append(doc[:length])
    return np.concatenate(pieces)[:max(n_tokens, 1)]


def prepare_synthetic(vocab_size: int, train_tokens: int = 2_000_000, seed: int = 1234,
                      root: Path | None = None, path: Path | None = None) -> TokenStore:
    """The synthetic corpus in `path`, else in `root` (default cache_root()) under its key."""
    key = f"synthetic-v{FORMAT_VERSION}b-vocab{vocab_size}-n{train_tokens}-seed{seed}"
    path = path or (root or cache_root()) / key
    if (path / MANIFEST).exists():
        return TokenStore.open(path)
    eval_tokens = max(train_tokens // 20, 50_000)
    splits = {
        "train": generate_synthetic(vocab_size, train_tokens, seed + 1, language_seed=seed),
        "valid": generate_synthetic(vocab_size, eval_tokens, seed + 2, language_seed=seed),
        "test": generate_synthetic(vocab_size, eval_tokens, seed + 3, language_seed=seed),
    }
    return write_store(path, splits, vocab_size, eos_id=0, source="synthetic", tokenizer_hash=key)
