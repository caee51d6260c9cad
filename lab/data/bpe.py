"""The byte-level BPE of a prepared corpus: trained on a sample of the training documents,
loaded from a tokenizers JSON file, identified by a hash, and run over documents in
parallel batches (`gatelab prepare`, lab/data/corpus.py, writes what it encodes).

Speed: the tokenizer is trained on a deterministic sample (the first `tokenizer_sample_mb`
of the training documents, in file order), then every split is encoded in parallel batches
(`encode_batch_fast`, which runs on all cores) and written to disk batch by batch, so no
Python list ever holds more than one batch of ids.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lab.data.store import END_OF_TEXT
from lab.errors import LabError

DEFAULT_VOCAB_SIZE = 16384
# Measured on the Gutenberg train shards (docs/data.md): a 16k BPE trained on the first
# 8 / 32 / 148 MB gives 1.6% / 0.8% / 0% more tokens on the valid split, and training on
# 148 MB costs 76 CPU-seconds against 14 for 32 MB.
DEFAULT_TOKENIZER_SAMPLE_MB = 32.0
ENCODE_BATCH_CHARS = 4_000_000   # characters per encode_batch call (bounds memory)
PIECE_CHARS = 200_000            # long documents are cut into pieces this long (parallelism)


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
