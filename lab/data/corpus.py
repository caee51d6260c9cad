"""`gatelab prepare`: a source's documents (lab/data/documents.py) encoded by the byte-level
BPE (lab/data/bpe.py) into a token store (lab/data/store.py), or the store already prepared
from the same content reused.

Every document lands in the token file preceded by the end-of-text id, so the token before
a document is its BOS.

The prepared store lives in a directory keyed by the content of the source files and the
tokenizer, so preparing the same corpus twice reuses it, and the same files give the same
tokens on any machine. The store is written into a temporary folder beside its place and
renamed there whole, so a failed or killed prepare leaves nothing that looks prepared.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lab.data.bpe import (DEFAULT_TOKENIZER_SAMPLE_MB, DEFAULT_VOCAB_SIZE, encode_documents,
                          load_tokenizer, sample_documents, tokenizer_hash, train_tokenizer)
from lab.data.documents import DEFAULT_HOLDOUT_EVERY, Documents, digest, resolve_splits
from lab.data.store import (END_OF_TEXT, FORMAT_VERSION, MANIFEST, SPLITS, TokenStore, cache_root,
                            prepare_synthetic, store_dtype, write_store)
from lab.errors import LabError, writable_folder


@dataclass
class Prepared:
    store: TokenStore
    reused: bool
    seconds: float = 0.0
    timings_s: dict = field(default_factory=dict)


def _slug(source: str) -> str:
    first = source.split(",")[0].rstrip("/")
    stem = first[len("hf:"):] if first.startswith("hf:") else Path(first).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:40] or "corpus"


def write_splits(directory: Path, splits: dict[str, Documents], bpe, source: str, extra: dict,
                 log: Callable[[str], None]) -> TokenStore:
    """Encode every split with `bpe` into a store in `directory` (tokenizer.json beside it);
    document counts and encoding times go into the manifest."""
    bpe.save(str(directory / "tokenizer.json"))
    dtype = store_dtype(bpe.get_vocab_size())
    documents = {s: 0 for s in SPLITS}
    timings = extra.setdefault("timings_s", {})

    def counted(split: str) -> Iterator[str]:
        for doc in splits[split]:
            documents[split] += 1
            yield doc

    def encoded(split: str) -> Iterator[np.ndarray]:
        log(f"encoding {split}: {splits[split].description}")
        started = time.time()
        yield from encode_documents(bpe, counted(split), dtype)
        if documents[split] == 0:
            raise LabError(f"data: the {split} split has no documents; add text, or pass "
                           "--valid and --test files")
        timings[f"encode_{split}"] = round(time.time() - started, 2)
        log(f"  {timings[f'encode_{split}']:.1f} s")

    return write_store(directory, {s: encoded(s) for s in SPLITS}, bpe.get_vocab_size(),
                       bpe.token_to_id(END_OF_TEXT), source=source,
                       tokenizer_hash=tokenizer_hash(bpe), extra=dict(extra, documents=documents))


def prepare(source: str, vocab_size: int | None = None, valid: str | None = None,
            test: str | None = None, tokenizer: str | Path | None = None,
            out: str | Path | None = None, text_field: str = "text",
            tokenizer_sample_mb: float | None = None, holdout_every: int | None = None,
            log: Callable[[str], None] | None = None) -> Prepared:
    """Tokenize a source into a token store (or reuse the one already prepared).

    `tokenizer` reuses a tokenizers JSON file instead of training one; then the store's
    vocabulary is the tokenizer's. The store goes to `out`, else to
    `cache_root()/<name>-v<vocab>-<key>`, where the key hashes the source files' content,
    the split rule, the text field and the tokenizer (given, or how it is trained).
    """
    log = log or (lambda message: None)
    if tokenizer_sample_mb is None:
        tokenizer_sample_mb = DEFAULT_TOKENIZER_SAMPLE_MB
    if holdout_every is None:
        holdout_every = DEFAULT_HOLDOUT_EVERY
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    if given is not None and vocab_size is not None and vocab_size != given.get_vocab_size():
        raise LabError(f"data: --vocab-size {vocab_size} does not match the tokenizer's "
                       f"vocabulary ({given.get_vocab_size()}); leave --vocab-size out")
    if given is not None:
        vocab_size = given.get_vocab_size()
    elif vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    if not 257 <= vocab_size < 2 ** 32:
        raise LabError(f"data: vocab_size must be between 257 (bytes + end-of-text) and 2^32, "
                       f"got {vocab_size}")
    if tokenizer_sample_mb <= 0:
        raise LabError(f"data: --tokenizer-sample-mb must be positive, got {tokenizer_sample_mb}")

    if source == "synthetic":
        if given is not None:
            raise LabError("data: the synthetic source has no text; --tokenizer does not apply")
        return Prepared(prepare_synthetic(vocab_size, path=Path(out) if out else None), reused=False)
    if Path(source).is_dir() and (Path(source) / MANIFEST).exists():
        store = TokenStore.open(source)
        _check_tokenizer(store, given)
        return Prepared(store, reused=True)

    started = time.time()
    splits = resolve_splits(source, valid, test, text_field, holdout_every)
    tokenizer_identity = (f"given:{tokenizer_hash(given)}" if given is not None
                          else f"bpe:{vocab_size}:sample_mb={tokenizer_sample_mb:g}")
    key = digest([f"format={FORMAT_VERSION}", tokenizer_identity]
                  + [f"{s}={splits[s].fingerprint}" for s in SPLITS])[:16]
    path = Path(out) if out else cache_root() / f"{_slug(source)}-v{vocab_size}-{key}"
    if (path / MANIFEST).exists():
        store = TokenStore.open(path)
        _check_tokenizer(store, given)
        if store.manifest.get("key") != key:
            raise LabError(f"data: {path} holds another corpus ({store.manifest.get('source')}); "
                           "choose another --out or delete it")
        return Prepared(store, reused=True)
    if path.exists() and any(path.iterdir()):
        raise LabError(f"data: --out {path} exists and is not a prepared corpus; choose an empty "
                       "or new directory")

    timings = {}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    where = "--out" if out else "data: the cache (GATELAB_CACHE)"
    writable_folder(where, path.parent)  # read-only: one line, before any progress line
    try:
        tmp.mkdir(parents=True)
        if given is None:
            log(f"training a {vocab_size}-token byte-level BPE on the first "
                f"{tokenizer_sample_mb:g} MB of the training documents")
            t0 = time.time()
            bpe = train_tokenizer(sample_documents(splits["train"],
                                                   int(tokenizer_sample_mb * 1e6)), vocab_size)
            timings["tokenizer_train"] = round(time.time() - t0, 2)
            log(f"  {timings['tokenizer_train']:.1f} s")
        else:
            bpe = given
        extra = dict(key=key, tokenizer=tokenizer_identity, text_field=text_field,
                     split_sources={s: splits[s].description for s in SPLITS}, timings_s=timings)
        write_splits(tmp, splits, bpe, source, extra, log)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.rmdir()  # empty (checked above)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / MANIFEST).exists():  # not a concurrent prepare of the same key
                raise
    except OSError as err:  # a full disk while the tokens are written (numpy's short write
        # names no errno: "N requested and M written"), so the free space is said too
        free = shutil.disk_usage(path.parent).free / 2 ** 20 if path.parent.exists() else 0
        raise LabError(f"{where}: cannot write the corpus to {path} ({err.strerror or err}; "
                       f"{free:,.0f} MiB free there); free space there or choose another --out "
                       "(nothing was kept)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(TokenStore.open(path), reused=False, seconds=time.time() - started,
                    timings_s=timings)


def _check_tokenizer(store: TokenStore, given) -> None:
    if given is not None and store.manifest.get("tokenizer_hash") != tokenizer_hash(given):
        raise LabError(f"data: {store.path} was tokenized with tokenizer "
                       f"{store.manifest.get('tokenizer_hash')}, not the given one "
                       f"({tokenizer_hash(given)}); prepare again with --out elsewhere")


def describe(prepared: Prepared) -> str:
    m = prepared.store.manifest
    action = "reused" if prepared.reused else f"prepared in {prepared.seconds:.1f} s"
    lines = [f"{action}: {prepared.store.path}",
             f"  vocab {m['vocab_size']} ({m['dtype']}), tokenizer {m['tokenizer_hash']}, "
             f"end-of-text/BOS id {m['eos_id']}"]
    for split in SPLITS:
        docs = m.get("documents", {}).get(split)
        docs_text = f" in {docs:,} documents" if docs is not None else ""
        lines.append(f"  {split}: {m['splits'][split]:,} tokens{docs_text}")
    lines.append(f"train on it: gatelab train --data {prepared.store.path}")
    return "\n".join(lines)
