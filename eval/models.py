"""What `--model` names: `default` (the embedded model, trained once and cached), a model directory, or a GGUF file.

Every model is loaded as a `LongCtxForCausalLM` (Llama directories and GGUF files through `longctx.convert`), so
`longctx.rope.set_rope` can switch its position scheme without reloading weights.
"""

import fcntl
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.data import load_tokenizer
from longctx.files import check_gguf, check_model_dir

DEFAULT_PRESET = "tiny"
DEFAULT_CORPUS = "shakespeare"
TRAIN_CONFIG = "train_config.yaml"  # the training config kept beside the cached default model


@dataclass
class LoadedModel:
    model: object  # LongCtxForCausalLM, in eval mode
    tokenizer: object
    name: str  # what the results are filed under
    fingerprint: str  # changes whenever the weights or config change: part of every cache key
    trained_on: tuple[str, int] | None = None  # (corpus, split_seed) from the training config beside the model


def cache_root() -> Path:
    """Where the default model is kept: $LONGCTX_CACHE, else ~/.cache/longctx."""
    return Path(os.environ.get("LONGCTX_CACHE") or Path.home() / ".cache" / "longctx")


def default_model_dir(log=print, progress=True) -> Path:
    """The embedded default model: trained with the `tiny` preset on the default corpus the first time, then
    cached. Training holds a lock (a second process waits, then finds the model), works in a staging folder that
    a killed run leaves behind and the next one removes, and moves the finished model into place with one
    `os.replace`: there is never half a model at the cached path. The path names a digest of the preset file
    (`default-<digest>`), so a changed preset trains a new default instead of reusing one trained by another."""
    from train.config import preset_path

    root = cache_root()
    target = root / f"default-{hashlib.sha256(preset_path(DEFAULT_PRESET).read_bytes()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".default.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        for stale in root.glob(".default-training-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        from train import load_preset, run_training

        log(f"No cached default model at {target}: training the '{DEFAULT_PRESET}' preset (once; a few minutes on "
            "CPU).")
        with tempfile.TemporaryDirectory(dir=root, prefix=".default-training-") as work:
            config = load_preset(DEFAULT_PRESET, {"out_dir": str(Path(work) / "run"), "progress": progress})
            staged = Path(work) / "model"
            shutil.copytree(run_training(config), staged)
            _copy_training_config(config, staged)
            os.replace(staged, target)
    log(f"Default model cached at {target}.")
    return target


def _copy_training_config(config, staged: Path):
    """Keep the run's config beside the model: it names the corpus, so the eval can use its held-out split."""
    shutil.copy(Path(config["out_dir"]) / "config.yaml", staged / TRAIN_CONFIG)


def training_corpus(directory) -> tuple[str, int] | None:
    """(corpus, split_seed) a model was trained on, read from the training config beside it: DIR/train_config.yaml
    (the cached default) or DIR/../config.yaml (a `python -m train` run's out_dir/model). None if not found."""
    import yaml

    directory = Path(directory)
    for path in (directory / TRAIN_CONFIG, directory.parent / "config.yaml"):
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            if isinstance(config, dict) and "corpus" in config:
                return str(config["corpus"]), int(config.get("split_seed", 0))
    return None


def fingerprint(paths) -> str:
    """Hash of the config files' bytes and the weight files' names, sizes and modification times."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
        else:
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def load_directory(directory, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a longctx or Llama model directory that also holds its tokenizer."""
    from longctx import LongCtxForCausalLM
    from longctx.convert import from_llama

    directory = Path(directory)
    model_type = check_model_dir(directory)["model_type"]  # damaged files: one line, before anything loads
    tokenizer = load_tokenizer(directory)  # then the tokenizer: a directory without one fails before the weights
    if model_type == "longctx":
        model = LongCtxForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    else:  # "llama" (check_model_dir admits no other)
        model = from_llama(directory).to(dtype)
    return model.to(device).eval(), tokenizer


def load_gguf(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a GGUF file (de-quantised; the tokenizer is read from the same file)."""
    from longctx.convert import from_llama

    path = Path(path)
    check_gguf(path)
    tokenizer = load_tokenizer(path)
    return from_llama(path).to(dtype).to(device).eval(), tokenizer


def load_model(spec: str, dtype=torch.float32, device="cpu", log=print, progress=True) -> LoadedModel:
    """Resolve `--model`: `default`, a directory, or a `.gguf` file."""
    if spec == "default":
        directory = default_model_dir(log, progress)
        model, tokenizer = load_directory(directory, dtype, device)
        return LoadedModel(model, tokenizer, "default", fingerprint(_model_files(directory)),
                           training_corpus(directory))
    path = Path(spec)
    if path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, dtype, device)
        return LoadedModel(model, tokenizer, path.stem, fingerprint([path]))
    if not path.exists():
        raise FileNotFoundError(f"--model {spec!r}: no such directory or .gguf file (or use 'default').")
    model, tokenizer = load_directory(path, dtype, device)
    resolved = path.resolve()  # a training run's output, runs/NAME/model, is filed under NAME
    name = resolved.parent.name if resolved.name == "model" and resolved.parent.name else resolved.name
    return LoadedModel(model, tokenizer, name, fingerprint(_model_files(path)), training_corpus(path))


def _model_files(directory: Path):
    return [p for p in Path(directory).iterdir() if p.name == "config.json" or p.suffix == ".safetensors"]
