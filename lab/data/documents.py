"""A source's text as documents, split into train / valid / test, each split with the
fingerprint that keys the prepared store (lab/data/corpus.py) by content.

A source is local files (`.txt`, `.jsonl`, `.parquet`; text and jsonl may be `.gz` or `.xz`;
globs allowed) or a Hugging Face dataset (`hf:<name>[:<config>]`, or `hf:<dir>` saved by
`datasets`). Documents are separated by `<|endoftext|>` in text files; each jsonl record or
parquet row is one document. A file's fingerprint is the SHA-256 of its bytes, so the same
files give the same key on any machine; without valid and test files, the splits are cut
from the training documents by position alone (`holdout`).

Every read error, a missing text field, an unknown file type, an unreachable Hub is one
LabError, raised before `gatelab prepare` prints its first progress line where it can be
(`probe_file`, `_check_hub_reachable`).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from lab.data.store import END_OF_TEXT, MANIFEST, SPLITS
from lab.errors import LabError

# Without explicit valid/test files, document i goes to valid when i % 50 == 0 and to
# test when i % 50 == 1: 2% each, decided by position alone, so the split is reproducible.
DEFAULT_HOLDOUT_EVERY = 50
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
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


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
    return Documents(read, digest(parts + [field_part]), ",".join(str(p) for p in files))


def holdout(documents: Documents, split: str, every: int) -> Documents:
    """The deterministic document-level split of one source (see DEFAULT_HOLDOUT_EVERY)."""
    def keep(index: int) -> bool:
        slot = index % every
        return {"valid": slot == 0, "test": slot == 1}.get(split, slot > 1)

    def read() -> Iterator[str]:
        return (doc for i, doc in enumerate(documents) if keep(i))
    return Documents(read, digest([documents.fingerprint, split, str(every)]),
                     f"{documents.description} (documents i % {every} "
                     + {"valid": "== 0", "test": "== 1"}.get(split, ">= 2") + ")")


def digest(parts: list[str]) -> str:
    """The SHA-256 of the parts, one a line: a split's fingerprint, and the store's cache
    key (lab/data/corpus.py); changing it moves every prepared corpus's key."""
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
        fingerprint = digest([source, split_name, text_field, str(dataset._fingerprint)])
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


# --- a source's splits ----------------------------------------------------------------

def resolve_splits(source: str, valid: str | None = None, test: str | None = None,
                   text_field: str = "text",
                   holdout_every: int = DEFAULT_HOLDOUT_EVERY) -> dict[str, Documents]:
    """A source's train / valid / test documents: `--valid`/`--test` files where given (an
    hf: source's own splits), else held out from the training documents by position."""
    if holdout_every < 3:
        raise LabError(f"data: --holdout-every must be at least 3, got {holdout_every}")
    if source.startswith("hf:"):
        if valid is not None or test is not None:
            raise LabError("data: --valid/--test are files; an hf: source brings its own splits")
        return hf_splits(source, text_field, holdout_every)
    return file_splits(source, valid, test, text_field, holdout_every)
