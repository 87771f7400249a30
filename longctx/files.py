"""Model files you did not write, checked before anything loads: one line saying which file is wrong and what to do.

A model directory (`config.json` + safetensors weights + tokenizer) or a GGUF file reaches transformers, safetensors
and gguf only once these checks pass, so a truncated download, an empty file, a damaged header or a config that is
not JSON is reported by name instead of as the library's own traceback — and a directory whose `config.json` asks
for remote code without naming its `model_type` is refused before transformers could prompt for it. Weights are
read from safetensors only (no pickle). Used by `longctx.convert` and the pipelines; not copied into checkpoints.
"""

import json
import os

SUPPORTED_MODEL_TYPES = ("longctx", "llama")
AGAIN = "copy or download it again, or save the model again with save_pretrained"


class ModelFileError(ValueError):
    """A model file is missing, damaged or of a kind that is not loaded."""


def _fail(path, problem, remedy=AGAIN):
    raise ModelFileError(f"{path}: {problem}; {remedy}.")


def read_config(directory) -> dict:
    """`directory/config.json` as a dict with a supported `model_type`."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a model directory (no config.json).")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except UnicodeDecodeError:
        _fail(path, "is not UTF-8 text (not a config.json)")
    except json.JSONDecodeError as err:
        _fail(path, f"is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})")
    if not isinstance(config, dict):
        _fail(path, f"holds a JSON {type(config).__name__}, not the object of a model config")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        what = "names no model_type" if model_type is None else f"has model_type={model_type!r}"
        extra = " (its auto_map asks for remote code, which is not run)" if "auto_map" in config else ""
        _fail(path, f"{what}{extra}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
              "a longctx or Llama checkpoint's config.json says which")
    return config


def check_safetensors(path) -> None:
    """The file is a complete safetensors file: an 8-byte header length, a JSON header, every tensor's bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(path, "is empty" if size == 0 else f"is truncated ({size} bytes, less than a safetensors header)")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            _fail(path, f"is damaged: its header claims {length} bytes, the whole file has {size} (truncated, or "
                        "not a safetensors file)")
        try:
            header = json.loads(f.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            _fail(path, "has a damaged header (not the JSON tensor table of a safetensors file)")
    if 8 + length + end > size:
        _fail(path, f"is truncated: its tensors need {8 + length + end} bytes, the file has {size}")


def check_model_dir(directory) -> dict:
    """A loadable model directory: its config (returned) and complete safetensors weights."""
    config = read_config(directory)
    weights = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not weights:
        pickled = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
        _fail(directory, "has no .safetensors weights" + (f" (only {', '.join(pickled)}, pickles, which are not "
                                                          "loaded)" if pickled else ""),
              "convert them to safetensors where you trust the source (save_pretrained(..., safe_serialization="
              "True))")
    for name in weights:
        check_safetensors(os.path.join(directory, name))
    return config


def check_gguf(path) -> None:
    """The file is a complete GGUF file that gguf can read (magic, metadata, every tensor's bytes)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        _fail(path, "is empty", "download it again")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # gguf reports a short file as a numpy reshape error: one clear line instead
        _fail(path, f"is not a readable GGUF file ({type(err).__name__}: {err}; {size} bytes — truncated?)",
              "download it again")
    if end > size:
        _fail(path, f"is truncated: its tensors need {end} bytes, the file has {size}", "download it again")


def check_model_source(source) -> str:
    """"gguf", or the model_type of a model directory, once `source`'s files pass the checks above."""
    source = os.fspath(source)
    if source.endswith(".gguf"):
        check_gguf(source)
        return "gguf"
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is neither a model directory nor a .gguf file")
    return check_model_dir(source)["model_type"]


__all__ = ["ModelFileError", "check_gguf", "check_model_dir", "check_model_source", "check_safetensors",
           "read_config"]
