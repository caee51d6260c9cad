"""Real text -> the token store: sources, the byte-level BPE, and `gatelab prepare`.

A source is local files (`.txt`, `.jsonl`, `.parquet`; text and jsonl may be `.gz` or `.xz`;
globs allowed), a Hugging Face dataset (`hf:<name>[:<config>]`, or `hf:<dir>` saved by
`datasets`), or `synthetic`. Documents are separated by `<|endoftext|>` in text files; each
jsonl record or parquet row is one document. Every document lands in the token file preceded
by the end-of-text id, so the token before a document is its BOS.

The prepared store lives in a directory keyed by the content of the source files and the
tokenizer (lab/data/store.py writes it), so preparing the same corpus twice reuses it, and the same
files give the same tokens on any machine.

Speed: the tokenizer is trained on a deterministic sample (the first `tokenizer_sample_mb`
of the training documents, in file order), then every split is encoded in parallel batches
(`encode_batch_fast`, which runs on all cores) and written to disk batch by batch, so no
Python list ever holds more than one batch of ids.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lab.data.store import (END_OF_TEXT, FORMAT_VERSION, MANIFEST, SPLITS, TokenStore, cache_root,
                            prepare_synthetic, store_dtype, write_store)
from lab.errors import LabError, writable_folder

DEFAULT_VOCAB_SIZE = 16384
# Measured on the Gutenberg train shards (docs/data.md): a 16k BPE trained on the first
# 8 / 32 / 148 MB gives 1.6% / 0.8% / 0% more tokens on the valid split, and training on
# 148 MB costs 76 CPU-seconds against 14 for 32 MB.
DEFAULT_TOKENIZER_SAMPLE_MB = 32.0
# Without explicit valid/test files, document i goes to valid when i % 50 == 0 and to
# test when i % 50 == 1: 2% each, decided by position alone, so the split is reproducible.
DEFAULT_HOLDOUT_EVERY = 50
ENCODE_BATCH_CHARS = 4_000_000   # characters per encode_batch call (bounds memory)
PIECE_CHARS = 200_000            # long documents are cut into pieces this long (parallelism)
TEXT_SUFFIXES = (".txt", ".text", ".md")
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open}
FORMATS_HELP = ".txt, .txt.gz, .txt.xz, .jsonl, .jsonl.gz, .jsonl.xz, .parquet"


# --- documents from files ------------------------------------------------------------

def file_format(path: Path) -> tuple[str, Callable]:
    """('text' | 'jsonl' | 'parquet', opener) from the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    opener = open
    if suffixes and suffixes[-1] in COMPRESSED:
        opener = COMPRESSED[suffixes.pop()]
    last = suffixes[-1] if suffixes else ""
    if last == ".parquet" and opener is open:
        return "parquet", opener
    if last == ".jsonl":
        return "jsonl", opener
    if last in TEXT_SUFFIXES:
        return "text", opener
    raise LabError(f"data: {path}: unknown file type; allowed: {FORMATS_HELP}")


def expand_files(spec: str, what: str) -> list[Path]:
    """Comma-separated files or globs -> existing, non-empty files (globs sorted by name)."""
    files: list[Path] = []
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise LabError(f"data: {what}: no files match {pattern!r}")
            files.extend(Path(m) for m in matches)
        else:
            files.append(Path(os.path.expanduser(pattern)))
    if not files:
        raise LabError(f"data: {what}: no files given")
    for path in files:
        if not path.exists():
            raise LabError(f"data: {what}: file not found: {path}")
        if path.is_dir():
            raise LabError(f"data: {what}: {path} is a directory without {MANIFEST}; pass its "
                           "files or a glob, or a directory written by `gatelab prepare`")
        if path.stat().st_size == 0:
            raise LabError(f"data: {what}: {path} is empty")
        file_format(path)
    return files


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, stripped, empty ones skipped; any read error is a LabError."""
    kind, opener = file_format(path)
    count = 0
    try:
        if kind == "parquet":
            docs = _parquet_documents(path, text_field)
        elif kind == "jsonl":
            docs = _jsonl_documents(path, opener, text_field)
        else:
            with opener(path, "rt", encoding="utf-8") as handle:
                text = handle.read()
            docs = (d.strip() for d in text.split(END_OF_TEXT))
        for doc in docs:
            if doc:
                count += 1
                yield doc
    except (lzma.LZMAError, zlib.error, EOFError, OSError, UnicodeDecodeError) as err:
        raise LabError(f"data: cannot read {path} (corrupt or not {kind}?): "
                       f"{type(err).__name__}: {err}") from None
    if count == 0:
        raise LabError(f"data: {path} is empty (no text)")


def _jsonl_documents(path: Path, opener, text_field: str) -> Iterator[str]:
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LabError(f"data: {path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise LabError(f"data: {path}:{line_no}: no text field {text_field!r} "
                               f"(found: {keys}); set it with --text-field")
            yield str(record[text_field])


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:  # an optional dependency, needed only for .parquet sources
        import pyarrow.parquet as pq
    except ImportError:
        raise LabError("data: .parquet files need pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise LabError(f"data: {path}: no column {text_field!r} (found: {', '.join(columns)}); "
                           "set it with --text-field")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield str(value)
    except LabError:
        raise
    except Exception as err:  # pyarrow raises its own ArrowInvalid / ArrowException types
        raise LabError(f"data: cannot read {path} as parquet: {err}") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --- a split's documents ----------------------------------------------------------------

@dataclass(frozen=True)
class Documents:
    """One split's documents: an iterable that can be read more than once, with a
    fingerprint (its identity in the cache key) and a description for the manifest."""

    read: Callable[[], Iterator[str]]
    fingerprint: str
    description: str

    def __iter__(self) -> Iterator[str]:
        return self.read()


PROBE_CHARS = 1 << 16  # what probe_file reads of a text file


def probe_file(path: Path, text_field: str) -> None:
    """Read the start of a file as `read_documents` will (the first 64k characters of text,
    the first record of jsonl or parquet), so that a corrupt archive, another encoding or a
    missing text field is one LabError before `prepare` prints its first progress line,
    not after minutes of tokenizer training."""
    kind, opener = file_format(path)
    if kind != "text":
        next(read_documents(path, text_field), None)
        return
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            handle.read(PROBE_CHARS)
    except (lzma.LZMAError, zlib.error, EOFError, OSError, UnicodeDecodeError) as err:
        raise LabError(f"data: cannot read {path} (corrupt or not {kind}?): "
                       f"{type(err).__name__}: {err}") from None


def file_documents(files: list[Path], text_field: str) -> Documents:
    for path in files:
        probe_file(path, text_field)

    def read() -> Iterator[str]:
        for path in files:
            yield from read_documents(path, text_field)
    parts = [f"{_file_sha256(p)}:{file_format(p)[0]}" for p in files]
    field_part = f"field={text_field}" if any(file_format(p)[0] != "text" for p in files) else ""
    return Documents(read, _digest(parts + [field_part]), ",".join(str(p) for p in files))


def holdout(documents: Documents, split: str, every: int) -> Documents:
    """The deterministic document-level split of one source (see DEFAULT_HOLDOUT_EVERY)."""
    def keep(index: int) -> bool:
        slot = index % every
        return {"valid": slot == 0, "test": slot == 1}.get(split, slot > 1)

    def read() -> Iterator[str]:
        return (doc for i, doc in enumerate(documents) if keep(i))
    return Documents(read, _digest([documents.fingerprint, split, str(every)]),
                     f"{documents.description} (documents i % {every} "
                     + {"valid": "== 0", "test": "== 1"}.get(split, ">= 2") + ")")


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _holdout_splits(documents: Documents, every: int) -> dict[str, Documents]:
    return {split: holdout(documents, split, every) for split in SPLITS}


def file_splits(source: str, valid: str | None, test: str | None, text_field: str,
                holdout_every: int) -> dict[str, Documents]:
    if (valid is None) != (test is None):
        raise LabError("data: give both --valid and --test files, or neither (then "
                       f"documents are split deterministically, every {holdout_every}th to each)")
    train_files = expand_files(source, "train")
    if valid is None:
        return _holdout_splits(file_documents(train_files, text_field), holdout_every)
    split_files = {"train": train_files, "valid": expand_files(valid, "valid"),
                   "test": expand_files(test, "test")}
    seen: dict[Path, str] = {}
    for split, files in split_files.items():
        for path in files:
            other = seen.setdefault(path.resolve(), split)
            if other != split:
                raise LabError(f"data: {path} is in both the {other} and the {split} split; "
                               "splits must be disjoint")
    return {split: file_documents(files, text_field) for split, files in split_files.items()}


# --- Hugging Face datasets ----------------------------------------------------------------

HF_VALID_NAMES = ("validation", "valid", "dev")


def hf_splits(source: str, text_field: str, holdout_every: int) -> dict[str, Documents]:
    """`hf:<name>[:<config>]` through `datasets.load_dataset`, or `hf:<dir>` saved with
    `save_to_disk`. Splits train / validation (or valid, dev) / test; missing valid/test
    are split from train by document, as for files."""
    spec = source[len("hf:"):]
    name, _, config = spec.partition(":")
    if not name:
        raise LabError("data: hf: give a dataset, e.g. hf:roneneldan/TinyStories or hf:<dir>")
    save = f"datasets.load_dataset({name!r}{', ' + repr(config) if config else ''})" \
           ".save_to_disk('DIR')"
    try:  # an optional dependency (the `hf` extra), needed only for hf: sources
        import datasets
    except ImportError:
        raise LabError("data: hf: sources need the `datasets` package: "
                       "pip install 'gated-attention-lab[hf]' (or point --data at local files)") \
            from None
    if not Path(name).is_dir():
        _check_hub_reachable(spec, save)
    try:
        if Path(name).is_dir():
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, config or None)
    except Exception as err:  # offline, unknown name, bad config: datasets raises many types
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LabError(f"data: cannot load Hugging Face dataset {spec!r} ({message}); where there "
                       f"is network, run `{save}` and copy DIR here, then --data hf:DIR; or point "
                       "--data at local .txt/.jsonl/.parquet files") from None
    if isinstance(loaded, datasets.DatasetDict):
        by_name = dict(loaded)
    else:
        by_name = {"train": loaded}
    if "train" not in by_name:
        raise LabError(f"data: {source}: no 'train' split (found: {', '.join(by_name)})")
    valid_name = next((n for n in HF_VALID_NAMES if n in by_name), None)

    def documents(split_name: str) -> Documents:
        dataset = by_name[split_name]
        if text_field not in dataset.column_names:
            raise LabError(f"data: {source} [{split_name}]: no column {text_field!r} "
                           f"(found: {', '.join(dataset.column_names)}); set it with --text-field")

        def read() -> Iterator[str]:
            for batch in dataset.iter(batch_size=1000):
                for text in batch[text_field]:
                    if text and text.strip():
                        yield text.strip()
        fingerprint = _digest([source, split_name, text_field, str(dataset._fingerprint)])
        return Documents(read, fingerprint, f"{source} [{split_name}]")

    train = documents("train")
    if valid_name is None or "test" not in by_name:
        return _holdout_splits(train, holdout_every)
    return {"train": train, "valid": documents(valid_name), "test": documents("test")}


HUB_TIMEOUT_S = 5.0


def _check_hub_reachable(spec: str, save: str) -> None:
    """A connection to the Hub's endpoint within HUB_TIMEOUT_S, unless the Hub is set
    offline (HF_HUB_OFFLINE: datasets then reads its local cache only). Without network,
    `load_dataset` retries each request five times with backoff, printing a line each
    time: 54 s and 11 lines before its error on a machine without network (issue 40)."""
    from huggingface_hub import constants  # a dependency of datasets

    if constants.HF_HUB_OFFLINE:
        return
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as err:
        raise LabError(f"data: cannot load Hugging Face dataset {spec!r}: no connection to the "
                       f"Hub at {endpoint.hostname}:{port} ({err.strerror or err}); where there "
                       f"is network, run `{save}` and copy DIR here, then --data hf:DIR; with "
                       "the dataset in the Hugging Face cache, set HF_HUB_OFFLINE=1; or point "
                       "--data at local .txt/.jsonl/.parquet files") from None


# --- the tokenizer -----------------------------------------------------------------------

def tokenizer_hash(tokenizer) -> str:
    """Identity of a tokenizer: the hash of its canonical serialisation (not of a file's
    formatting), so a saved and reloaded tokenizer has the same hash."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise LabError(f"data: --tokenizer: file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise LabError(f"data: --tokenizer: {path} is not a tokenizers JSON file ({err})") from None
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        raise LabError(f"data: --tokenizer: {path} has no {END_OF_TEXT} token (documents are "
                       "separated by it)")
    return tokenizer


def sample_documents(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """The first `max_chars` characters of the documents, in order (the last one cut)."""
    left = max_chars
    for doc in documents:
        if left <= 0:
            return
        yield doc[:left]
        left -= len(doc)


def train_tokenizer(documents: Iterable[str], vocab_size: int):
    """Byte-level BPE (GPT-2 pre-tokenisation, no prefix space) with <|endoftext|> as its
    only special token; every byte is in the alphabet, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


# A cut between a non-space and a single space or newline that precedes a non-space does
# not change GPT-2 pre-tokenisation (the whitespace joins the word after it, or stands
# alone), and BPE never merges across pre-tokens: pieces encode exactly like the whole.
_SAFE_CUT = re.compile(r"(?<=\S)(?=[ \n]\S)")


def split_long(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = _SAFE_CUT.search(text, start + piece_chars)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def encode_documents(tokenizer, documents: Iterable[str], dtype,
                     batch_chars: int = ENCODE_BATCH_CHARS) -> Iterator[np.ndarray]:
    """Token arrays for consecutive batches of documents, each document preceded by the
    end-of-text id. Pieces of a batch are encoded in parallel by the tokenizer."""
    eos = tokenizer.token_to_id(END_OF_TEXT)
    pieces: list[str] = []
    opens_document: list[bool] = []
    chars = 0

    def flush() -> np.ndarray:
        encoded = tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
        arrays = []
        for starts, item in zip(opens_document, encoded):
            if starts:
                arrays.append(np.array([eos], dtype=dtype))
            arrays.append(np.asarray(item.ids, dtype=dtype))
        pieces.clear()
        opens_document.clear()
        return np.concatenate(arrays)

    for doc in documents:
        for i, piece in enumerate(split_long(doc)):
            pieces.append(piece)
            opens_document.append(i == 0)
            chars += len(piece)
        if chars >= batch_chars:
            yield flush()
            chars = 0
    if pieces:
        yield flush()


# --- prepare ------------------------------------------------------------------------------

@dataclass
class Prepared:
    store: TokenStore
    reused: bool
    seconds: float = 0.0
    timings_s: dict = field(default_factory=dict)


def resolve_splits(source: str, valid: str | None = None, test: str | None = None,
                   text_field: str = "text",
                   holdout_every: int = DEFAULT_HOLDOUT_EVERY) -> dict[str, Documents]:
    if holdout_every < 3:
        raise LabError(f"data: --holdout-every must be at least 3, got {holdout_every}")
    if source.startswith("hf:"):
        if valid is not None or test is not None:
            raise LabError("data: --valid/--test are files; an hf: source brings its own splits")
        return hf_splits(source, text_field, holdout_every)
    return file_splits(source, valid, test, text_field, holdout_every)


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
    key = _digest([f"format={FORMAT_VERSION}", tokenizer_identity]
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
