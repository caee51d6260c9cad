"""lab/data/ (store, windows, documents, bpe, corpus, sources): text -> tokens -> windows, on
small files written here."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.cli import main
from lab.data import corpus
from lab.data.bpe import load_tokenizer, split_long
from lab.data.documents import read_documents
from lab.data.sources import open_source
from lab.data.store import END_OF_TEXT, TokenStore, prepare_synthetic, write_store
from lab.data.windows import WindowSampler, check_batch_fits, eval_windows
from lab.errors import LabError

# CI keeps the shared corpora in ../shared beside the clone; GATELAB_SHARED points elsewhere.
SHARED = Path(os.environ.get("GATELAB_SHARED", Path(__file__).resolve().parents[3] / "shared"))
GUTENBERG = SHARED / "data" / "gutenberg-en"
WORDS = ("the sea ship captain whale night storm harbour sailed island wind rope deck "
         "lantern Ahab said quietly and then 1851 of a to in was his her it").split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Distinct English-like documents (each opens with its number, so none repeats)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(6, 12))) + "."
                 for _ in range(rng.integers(4, 9))]
        docs.append(f"Chapter {i}.\n" + "\n".join(lines) + "\n\n\u00e9t\u00e9 \u2014 caf\u00e9!")
    return docs


def write_text(path: Path, docs: list[str]) -> Path:
    text = "".join(f"{d}\n{END_OF_TEXT}\n" for d in docs)
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write(text)
    return path


def decoded_documents(store: TokenStore, split: str) -> list[str]:
    tokenizer = load_tokenizer(store.path / "tokenizer.json")
    tokens = np.asarray(store.tokens(split)).astype(np.int64)
    bounds = list(store.document_starts(split)) + [len(tokens)]
    return [tokenizer.decode(tokens[a + 1:b].tolist()) for a, b in zip(bounds, bounds[1:])]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def text_corpus(tmp_path):
    docs = {"train": make_documents(60, 0), "valid": make_documents(8, 1),
            "test": make_documents(8, 2)}
    docs["valid"] = [d.replace("Chapter", "Valid") for d in docs["valid"]]
    docs["test"] = [d.replace("Chapter", "Test") for d in docs["test"]]
    files = {s: write_text(tmp_path / f"{s}.txt", d) for s, d in docs.items()}
    return docs, files


@pytest.fixture
def prepared(text_corpus, cache):
    docs, files = text_corpus
    return corpus.prepare(str(files["train"]), 400, str(files["valid"]), str(files["test"]))


# --- text -> tokens -> text ----------------------------------------------------------------

def test_round_trip_text_tokens_text(text_corpus, prepared):
    docs, _ = text_corpus
    store = prepared.store
    assert not prepared.reused
    assert store.vocab_size == 400 and store.manifest["dtype"] == "uint16"
    assert store.manifest["documents"] == {"train": 60, "valid": 8, "test": 8}
    for split in ("train", "valid", "test"):
        assert decoded_documents(store, split) == docs[split]
        assert store.tokens(split)[0] == store.eos_id == store.manifest["bos_id"]
        assert store.manifest["splits"][split] == len(store.tokens(split))


def test_long_documents_are_cut_where_tokens_do_not_change(prepared):
    tokenizer = load_tokenizer(prepared.store.path / "tokenizer.json")
    text = "\n\n".join(make_documents(20, 5)) + "  trailing  spaces\n\n\nand   gaps"
    pieces = split_long(text, piece_chars=50)
    assert len(pieces) > 10 and "".join(pieces) == text
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    cut = [i for p in pieces for i in tokenizer.encode(p, add_special_tokens=False).ids]
    assert cut == whole


def test_uint32_tokens_when_the_vocabulary_needs_them(tmp_path):
    tokens = np.array([0, 70_000, 65_536, 5], dtype=np.int64)
    store = write_store(tmp_path / "big", {s: tokens for s in ("train", "valid", "test")},
                        vocab_size=70_001, eos_id=0, source="test", tokenizer_hash="x")
    reopened = TokenStore.open(store.path)
    assert reopened.manifest["dtype"] == "uint32"
    assert np.array_equal(reopened.tokens("train"), tokens)


# --- sources ---------------------------------------------------------------------------

def test_every_file_format_gives_the_same_tokens(tmp_path, text_corpus, prepared, cache):
    """txt, txt.gz, txt.xz, jsonl(.gz) and parquet of the same documents, one tokenizer."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    docs, files = text_corpus
    tokenizer = prepared.store.path / "tokenizer.json"
    expected = np.asarray(prepared.store.tokens("train"))
    sources = [write_text(tmp_path / "train.txt.gz", docs["train"]),
               write_text(tmp_path / "train.txt.xz", docs["train"])]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs["train"]))
    pq.write_table(pa.table({"body": docs["train"]}), tmp_path / "train.parquet")
    sources += [tmp_path / "train.jsonl.gz", tmp_path / "train.parquet"]
    for source in sources:
        result = corpus.prepare(str(source), None, str(files["valid"]), str(files["test"]),
                                tokenizer=tokenizer, text_field="body")
        assert np.array_equal(result.store.tokens("train"), expected), source
        assert result.store.manifest["tokenizer_hash"] == prepared.store.manifest["tokenizer_hash"]


def test_glob_and_document_level_split_are_deterministic_and_disjoint(tmp_path, cache):
    docs = make_documents(30, 3)
    write_text(tmp_path / "part-1.txt", docs[:15])
    write_text(tmp_path / "part-2.txt.xz", docs[15:])
    first = corpus.prepare(str(tmp_path / "part-*"), 300, holdout_every=5).store
    split_docs = {s: decoded_documents(first, s) for s in ("train", "valid", "test")}
    assert split_docs["valid"] == docs[0::5] and split_docs["test"] == docs[1::5]
    assert sorted(sum(split_docs.values(), [])) == sorted(docs)  # disjoint and complete
    again = corpus.prepare(str(tmp_path / "part-*"), 300, holdout_every=5, out=tmp_path / "again")
    for split in ("train", "valid", "test"):
        assert np.array_equal(first.tokens(split), again.store.tokens(split))


def test_train_opens_a_text_source_through_the_same_cache(text_corpus, prepared):
    _, files = text_corpus
    store = open_source(str(files["train"]), 400, str(files["valid"]), str(files["test"]))
    assert store.path == prepared.store.path


def test_hf_dataset_saved_by_datasets(tmp_path, text_corpus, prepared, cache):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package (extra "
                                   "'hf') is not installed")
    docs, _ = text_corpus
    saved = tmp_path / "hf-saved"
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": docs[name]})
                          for split, name in (("train", "train"), ("validation", "valid"),
                                              ("test", "test"))}).save_to_disk(str(saved))
    result = corpus.prepare(f"hf:{saved}", tokenizer=prepared.store.path / "tokenizer.json")
    for split in ("train", "valid", "test"):
        assert np.array_equal(result.store.tokens(split), prepared.store.tokens(split))


def test_hf_offline_names_what_to_download(monkeypatch, cache):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not "
                                   "installed")
    import huggingface_hub.constants

    # Offline mode (read at import, hence set on the modules): fail at once, not after retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LabError, match="save_to_disk"):
        corpus.prepare("hf:no-such-owner/no-such-dataset-xyz")


def test_hf_without_datasets_says_what_to_install(monkeypatch, cache):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(LabError, match=r"gated-attention-lab\[hf\]"):
        corpus.prepare("hf:some/dataset")


# --- the cache ---------------------------------------------------------------------------

def test_second_prepare_reuses_the_cache_without_tokenizing(text_corpus, prepared, monkeypatch):
    _, files = text_corpus
    mtime = (prepared.store.path / "train.bin").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("retokenized")

    monkeypatch.setattr(corpus, "encode_documents", fail)
    monkeypatch.setattr(corpus, "train_tokenizer", fail)
    again = corpus.prepare(str(files["train"]), 400, str(files["valid"]), str(files["test"]))
    assert again.reused and again.store.path == prepared.store.path
    assert (prepared.store.path / "train.bin").stat().st_mtime_ns == mtime


def test_cache_key_follows_content_vocabulary_and_tokenizer(text_corpus, prepared):
    _, files = text_corpus
    other_vocab = corpus.prepare(str(files["train"]), 300, str(files["valid"]), str(files["test"]))
    assert other_vocab.store.path != prepared.store.path
    given = corpus.prepare(str(files["train"]), None, str(files["valid"]), str(files["test"]),
                           tokenizer=other_vocab.store.path / "tokenizer.json")
    assert given.store.path not in (prepared.store.path, other_vocab.store.path)
    assert given.store.manifest["tokenizer_hash"] == other_vocab.store.manifest["tokenizer_hash"]
    with open(files["train"], "a") as handle:
        handle.write("One more document.\n")
    changed = corpus.prepare(str(files["train"]), 400, str(files["valid"]), str(files["test"]))
    assert not changed.reused and changed.store.path != prepared.store.path



def test_the_fingerprint_tells_corpora_apart_and_follows_the_store_not_its_folder(
        text_corpus, prepared, tmp_path):
    """TokenStore.fingerprint, the digest of every run's dataset input (lab/records/runs.py
    log_corpus): the prepared corpus's key; for the synthetic corpus, its manifest's identity."""
    _, files = text_corpus
    other = corpus.prepare(str(files["train"]), 300, str(files["valid"]), str(files["test"]))
    assert prepared.store.fingerprint == prepared.store.manifest["key"]
    assert other.store.fingerprint != prepared.store.fingerprint
    synthetic = {seed: prepare_synthetic(512, 60_000, seed, root=tmp_path / "synthetic")
                 for seed in (1, 2)}
    assert synthetic[1].fingerprint != synthetic[2].fingerprint
    assert len({s.fingerprint for s in synthetic.values()} | {prepared.store.fingerprint}) == 3
    # The same tokens in another folder: the same corpus, the same fingerprint.
    copy = tmp_path / "copy"
    shutil.copytree(synthetic[1].path, copy)
    assert TokenStore.open(copy).fingerprint == synthetic[1].fingerprint
    assert re.fullmatch("[0-9a-f]{16}", synthetic[1].fingerprint)


# --- windows ----------------------------------------------------------------------------

def test_windows_are_a_pure_function_of_seed_and_index(prepared):
    store = prepared.store
    a = WindowSampler(store, seq_len=16, micro_batch=4, seed=7)
    b = WindowSampler(store, seq_len=16, micro_batch=4, seed=7)
    c = WindowSampler(store, seq_len=16, micro_batch=4, seed=8)
    for index in (0, 1, 5):
        assert all(torch.equal(x, y) for x, y in zip(a.batch(index), b.batch(index)))
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], c.batch(0)[0])
    inputs, targets = a.batch(3)
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.slow
def test_training_resumes_at_a_micro_batch_index(prepared):
    from lab.training.module import _TrainBatches

    sampler = WindowSampler(prepared.store, seq_len=16, micro_batch=2, seed=3)
    from_start = iter(_TrainBatches(sampler, start=0, rank=0, world=1))
    straight = [next(from_start) for _ in range(8)]
    resumed = iter(_TrainBatches(sampler, start=5, rank=0, world=1))
    for expected in straight[5:]:
        got = next(resumed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_bos_aligned_windows_start_with_bos(prepared):
    store = prepared.store
    sampler = WindowSampler(store, seq_len=32, micro_batch=8, seed=0, bos_aligned=True)
    for index in range(5):
        inputs, _ = sampler.batch(index)
        assert (inputs[:, 0] == store.eos_id).all()
    windows = eval_windows(store, "valid", 32, 4, bos_aligned=True)
    assert (windows[:, 0] == store.eos_id).all()
    unaligned = torch.cat([WindowSampler(store, 32, 8, 0).batch(i)[0][:, 0] for i in range(5)])
    assert (unaligned != store.eos_id).any()


def test_bos_prefix_windows_open_with_bos_anywhere_in_the_split(prepared):
    """BOS then seq_len tokens of a random window: position 0 is BOS, and the windows are as
    many and as varied as random windows (unlike document-start alignment)."""
    store = prepared.store
    tokens = np.asarray(store.tokens("train"))
    prefixed = WindowSampler(store, seq_len=32, micro_batch=8, seed=0, bos_prefix=True)
    plain = WindowSampler(store, seq_len=32, micro_batch=8, seed=0)
    starts = set()
    for index in range(10):
        inputs, targets = prefixed.batch(index)
        assert (inputs[:, 0] == store.eos_id).all()
        # After BOS the window is the same stretch of text the plain sampler would draw.
        assert torch.equal(targets, plain.batch(index)[0])
        for row in targets.numpy():
            matches = [o for o in range(len(tokens) - 32) if (tokens[o:o + 32] == row).all()]
            starts.update(matches[:1])
    assert len(starts) > len(store.document_starts("train"))
    windows = eval_windows(store, "valid", 32, 6, bos_prefix=True)
    assert windows.shape == (6, 33) and (windows[:, 0] == store.eos_id).all()


def test_bos_aligned_refuses_a_run_that_would_memorise_its_few_documents(prepared):
    store = prepared.store
    starts = len(store.document_starts("train"))
    check_batch_fits(store, seq_len=16, micro_batch=2, bos_aligned=True, train_windows=4 * starts)
    with pytest.raises(LabError, match="data.bos_prefix=true"):
        check_batch_fits(store, seq_len=16, micro_batch=2, bos_aligned=True,
                         train_windows=4 * starts + 1)


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("empty", "is empty"),
    ("blank", "is empty"),
    ("glob", "no files match"),
    ("xz", "cannot read"),
    ("gz", "cannot read"),
    ("suffix", "unknown file type"),
    ("jsonl-field", "no text field 'text'"),
    ("jsonl-bad", "not valid JSON"),
    ("valid-only", "both --valid and --test"),
    ("overlap", "in both the train and the valid split"),
    ("few-docs", "split has no documents"),
])
def test_bad_input_is_one_clear_error(tmp_path, cache, case, message):
    good = write_text(tmp_path / "good.txt", make_documents(5))
    valid, test = str(good), str(write_text(tmp_path / "test.txt", make_documents(3, 9)))
    source = str(tmp_path / "bad.txt")
    if case == "empty":
        (tmp_path / "bad.txt").write_text("")
    elif case == "blank":
        (tmp_path / "bad.txt").write_text(f"\n  \n{END_OF_TEXT}\n\n")
    elif case == "glob":
        source = str(tmp_path / "nothing-*.txt")
    elif case == "xz":
        source = str(tmp_path / "bad.txt.xz")
        whole = lzma.compress(" ".join(make_documents(20)).encode())
        Path(source).write_bytes(whole[:len(whole) // 2])  # truncated
    elif case == "gz":
        source = str(tmp_path / "bad.txt.gz")
        Path(source).write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data at all")
    elif case == "suffix":
        source = str(tmp_path / "bad.csv")
        Path(source).write_text("a,b\n")
    elif case == "jsonl-field":
        source = str(tmp_path / "bad.jsonl")
        Path(source).write_text(json.dumps({"content": "hello"}) + "\n")
    elif case == "jsonl-bad":
        source = str(tmp_path / "bad.jsonl")
        Path(source).write_text('{"text": "fine"}\n{"text": broken\n')
    elif case == "valid-only":
        source, test = str(good), None
    elif case == "overlap":
        source = str(good)
        valid = str(good)
    elif case == "few-docs":  # one document: it goes to valid, none is left for test
        source, valid, test = str(write_text(tmp_path / "one.txt", make_documents(1))), None, None
    with pytest.raises(LabError, match=message):
        corpus.prepare(source, 300, valid, test)
    assert not list(cache.rglob("manifest.json")) and not list(cache.glob(".*tmp*"))


def test_a_cached_store_with_another_tokenizer_is_refused(text_corpus, prepared, tmp_path):
    _, files = text_corpus
    other = corpus.prepare(str(files["train"]), 300, str(files["valid"]), str(files["test"]))
    other_tokenizer = other.store.path / "tokenizer.json"
    with pytest.raises(LabError, match="tokenized with tokenizer"):
        corpus.prepare(str(prepared.store.path), tokenizer=other_tokenizer)
    out = tmp_path / "mine"
    corpus.prepare(str(files["train"]), 400, str(files["valid"]), str(files["test"]), out=out)
    with pytest.raises(LabError, match="tokenized with tokenizer"):
        corpus.prepare(str(files["train"]), None, str(files["valid"]), str(files["test"]),
                       tokenizer=other_tokenizer, out=out)


def test_a_tokenizer_without_end_of_text_is_refused(tmp_path, prepared):
    spec = json.loads((prepared.store.path / "tokenizer.json").read_text())
    spec["added_tokens"] = []
    spec["model"]["vocab"].pop(END_OF_TEXT)
    (tmp_path / "tok.json").write_text(json.dumps(spec))
    with pytest.raises(LabError, match=re.escape(f"no {END_OF_TEXT} token")):
        corpus.prepare("synthetic", tokenizer=tmp_path / "tok.json")


def test_too_few_tokens_for_one_batch_fails_before_training(prepared, tmp_path):
    store = prepared.store
    valid_tokens = store.manifest["splits"]["valid"]
    check_batch_fits(store, seq_len=16, micro_batch=2)
    with pytest.raises(LabError, match="the valid split .* fewer than one micro-batch"):
        check_batch_fits(store, seq_len=valid_tokens // 2, micro_batch=4)
    # The train split's only document starts 5 tokens before its end: no BOS-aligned window.
    late_start = np.array([7] * 100 + [0] + [7] * 5)
    late = write_store(tmp_path / "late", {s: late_start for s in ("train", "valid", "test")},
                       vocab_size=8, eos_id=0, source="test", tokenizer_hash="x")
    check_batch_fits(late, seq_len=16, micro_batch=2)
    with pytest.raises(LabError, match="data.bos_aligned"):
        check_batch_fits(late, seq_len=16, micro_batch=2, bos_aligned=True)


def test_cli_prepare_and_train_errors_are_one_line(text_corpus, cache, tmp_path, monkeypatch,
                                                   capsys):
    _, files = text_corpus
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["prepare", "--data", str(files["train"]), "--valid", str(files["valid"]),
                 "--test", str(files["test"]), "--vocab-size", "400", "--quiet"]) == 0
    out = capsys.readouterr().out
    path = out.split("prepared in")[1].split(": ", 1)[1].splitlines()[0]
    assert "train: " in out and "tokens in 60 documents" in out
    assert main(["prepare", "--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: data: train: file not found: " \
                                              f"{tmp_path / 'missing.txt'}"
    code = main(["train", "--preset", "tiny", "--data", path, "--tokens", "1e4", "--quiet",
                 "--set", "train.batch_size=64", "--set", "model.context=128"])
    err = capsys.readouterr().err
    assert code == 2 and "fewer than one micro-batch" in err and err.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists()


# --- the real corpus ----------------------------------------------------------------------

@pytest.mark.skipif(not GUTENBERG.is_dir(), reason="the shared Gutenberg corpus is absent "
                    "(shared/data/gutenberg-en beside the clone, or GATELAB_SHARED)")
def test_gutenberg_valid_file(cache):
    source = str(GUTENBERG / "valid.txt.xz")
    result = corpus.prepare(source, 1024, holdout_every=3, tokenizer_sample_mb=0.5)
    store = result.store
    assert store.manifest["documents"] == {"train": 4, "valid": 4, "test": 4}
    total_chars = sum(len(d) for d in read_documents(Path(source)))
    total_tokens = sum(store.manifest["splits"].values())
    assert 2.0 < total_chars / total_tokens < 5.0  # bytes per token of a small English BPE
    first = next(read_documents(Path(source)))
    assert decoded_documents(store, "valid")[0] == first


def test_hf_without_a_connection_to_the_hub_fails_at_once_without_retries(monkeypatch, cache):
    """No network: one line before `datasets` is asked (which retries each request five times,
    a line each: 54 s and 11 lines, issue 40)."""
    pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    import socket

    import datasets
    import huggingface_hub.constants

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")

    def asked(*args, **kwargs):
        raise AssertionError("load_dataset was called")

    monkeypatch.setattr(datasets, "load_dataset", asked)
    started = time.monotonic()
    with pytest.raises(LabError, match=rf"no connection to the Hub at 127.0.0.1:{port} .*"
                                       "HF_HUB_OFFLINE=1"):
        corpus.prepare("hf:some-owner/some-dataset")
    assert time.monotonic() - started < 10
