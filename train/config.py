"""Training configuration: the keys (`TrainConfig`), the presets in `train/configs/`, `--key value` overrides,
validation.

A config is a plain dict: `DEFAULTS` <- preset YAML <- overrides. `resolve_config` checks every key once, before
any data is read or any model is built, and raises `ConfigError` naming the key, the value and what is allowed.
`python -m train --print-config-table` prints the table of keys that README "Training and fine-tuning"
holds.
"""

import copy
import importlib.util
import json
import math
import os
import shutil
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = ("tiny", "small", "125m", "350m")
MIXED_PRECISION = ("no", "bf16", "fp16")
COPY_SOURCES = ("text", "random")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# LongCtxConfig fields the pipeline sets itself: from the tokenizer, from seq_len, or derived by the config.
PIPELINE_MODEL_FIELDS = {"vocab_size": "the tokenizer", "bos_token_id": "the tokenizer",
                         "eos_token_id": "the tokenizer", "pad_token_id": "the tokenizer",
                         "max_position_embeddings": "seq_len",
                         "layer_types": "block_types", "use_cache": "the pipeline"}
# With init_from, the architecture is the source model's; these model fields may still change (length extension).
EXTENSION_MODEL_FIELDS = ("rope_parameters", "logn_scaling", "attention_dropout")
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def extension_fields(model: dict) -> dict:
    """The `model` fields an init_from run may change (and records): `EXTENSION_MODEL_FIELDS`."""
    return {k: v for k, v in model.items() if k in EXTENSION_MODEL_FIELDS}


def _key(default, doc: str, **checks):
    """A `TrainConfig` field: its default, its one-line doc and the checks `resolve_config` applies to it alone
    (`minimum`, `maximum`, `choices`)."""
    metadata = {"doc": doc, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every key of a training config: its type, default and meaning. The single source of the keys: `DEFAULTS`,
    the checks of `resolve_config`, `python -m train --help` and the README's table (`config_table`) come from it.

    A run's config is the plain dict of these fields (`DEFAULTS` <- preset YAML <- overrides), as the presets,
    `config.yaml` and the checkpoints hold it; `model` and `lora` are nested dicts (LongCtxConfig fields, LoRA keys).
    """

    corpus: str = _key("shakespeare", "named corpus (shakespeare, kjv, pystdlib), a txt/jsonl/parquet file, "
                                      "directory or glob, or a hub dataset name")
    split_seed: int = _key(0, "seed of the whole-document train/validation/test split", minimum=0)
    vocab_size: int = _key(4096, "sentencepiece BPE trained on the train split (ignored with init_from)",
                           minimum=300)
    seq_len: int = _key(256, "tokens per training window (L_train; the length of fine-tuning with init_from)",
                        minimum=1)
    seq_len_multiple: int = _key(64, "seq_len must be a multiple of this", minimum=1)
    copy_fraction: float = _key(0.0, "training windows with a span copied later in them "
                                     "(longctx.data.add_copied_spans)", minimum=0.0, maximum=1.0)
    copy_span: list[int] = _key([16, 64], "the copied span's length in tokens, [min, max]")
    copy_source: str = _key("text", "the span copied: the window's own text, or uniform random ids (a retrieval span)",
                            choices=COPY_SOURCES)
    passkey_fraction: float = _key(0.0, "training windows with a passkey needle and, later, its question and answer "
                                        "(longctx.data.add_passkey_spans)", minimum=0.0, maximum=1.0)
    passkey_from_step: int = _key(0, "steps before this one draw the same windows without passkey spans (copying "
                                     "first, then retrieval: RESULTS.md section 3)", minimum=0)
    model: dict = _key({}, "LongCtxConfig fields: architecture and position scheme")
    attn_implementation: str = _key("sdpa", "the attention backend", choices=ATTN_IMPLEMENTATIONS)
    gradient_checkpointing: bool = _key(False, "recompute activations in the backward pass: less memory, slower")
    chunked_loss: bool = _key(True, "fused projection + cross-entropy (longctx.loss): no logits held, faster")
    compile: bool | str = _key(False, "torch.compile the model: false, true (inductor) or a torch.compile backend name")
    init_from: str | None = _key(None, "model dir or .gguf to start from (fine-tuning / length extension)")
    lora: dict | bool | None = _key(None, "LoRA through peft: true or {r, alpha, dropout, target_modules}")
    batch_size: int = _key(16, "sequences per optimizer step, all processes together", minimum=1)
    micro_batch_size: int = _key(16, "sequences per forward/backward on one process", minimum=1)
    max_steps: int = _key(500, "optimizer steps of the run", minimum=1)
    lr: float = _key(3.0e-3, "peak learning rate (after warmup)")
    min_lr: float = _key(3.0e-4, "cosine decay ends here at max_steps")
    warmup_steps: int = _key(50, "linear warmup", minimum=0)
    weight_decay: float = _key(0.1, "on weight matrices and embeddings only")
    beta1: float = _key(0.9, "AdamW's first-moment decay", minimum=0.0, maximum=1.0)
    beta2: float = _key(0.95, "AdamW's second-moment decay", minimum=0.0, maximum=1.0)
    grad_clip: float = _key(1.0, "max global gradient norm; 0 = no clipping")
    eval_every: int = _key(100, "validation loss every N steps (and at the end)", minimum=1)
    eval_windows: int = _key(64, "validation windows scored each time; 0 = all", minimum=0)
    save_every: int = _key(100, "checkpoint every N steps (and at the end)", minimum=1)
    keep_last: int = _key(2, "checkpoints kept", minimum=1)
    mixed_precision: str = _key("no", "accelerate's autocast", choices=MIXED_PRECISION)
    context_parallel: int = _key(1, "processes each sequence is split over (accelerate's ParallelismConfig cp_size; "
                                    "CUDA, an FSDP2 launch, SDPA; train/context_parallel.py)", minimum=1)
    seed: int = _key(0, "model init and data order", minimum=0)
    out_dir: str = _key("runs/tiny", "the run directory: config, log, tokenizer, checkpoints, final model")
    resume: bool = _key(False, "continue from the last checkpoint in out_dir")
    overwrite: bool = _key(False, "start over in an out_dir that already holds a run")
    progress: bool = _key(True, "tqdm progress bar")


CONFIG_FIELDS = fields(TrainConfig)
DEFAULTS = asdict(TrainConfig())  # every key and its default: a plain dict, as configs are
# Keys that may be given bare on the command line (`--resume` = `--resume true`): those that can be true.
FLAGS = frozenset(f.name for f in CONFIG_FIELDS if f.type is bool or bool in typing.get_args(f.type))


def _type_name(annotation) -> str:
    """`int`, `list[int]`, `str or null`: a field's type in words (no `|`: it would split a Markdown cell)."""
    if typing.get_args(annotation) and isinstance(annotation, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in typing.get_args(annotation))
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _doc(f) -> str:
    """A field's one-line doc, with its allowed values where it has a fixed set."""
    choices = f.metadata.get("choices")
    return f.metadata["doc"] + (f"; one of {', '.join(f'`{c}`' for c in choices)}" if choices else "")


def config_table() -> str:
    """The Markdown table of every key (type, default, meaning) that README "Training and fine-tuning" holds
    verbatim (a test compares them); printed by `python -m train --print-config-table`."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {_type_name(f.type)} | `{json.dumps(DEFAULTS[f.name])}` | {_doc(f)} |"
             for f in CONFIG_FIELDS]
    return "\n".join(rows)


def config_help() -> str:
    """The keys for `python -m train --help`: one line each, `--key DEFAULT  meaning`."""
    usage = {f.name: f"--{f.name} {json.dumps(DEFAULTS[f.name])}" for f in CONFIG_FIELDS}
    width = max(map(len, usage.values())) + 2
    return "\n".join(f"  {usage[f.name]:<{width}}{_doc(f).replace('`', '')}" for f in CONFIG_FIELDS)


class ConfigError(ValueError):
    """A bad config key or value, raised before any training."""


def _fail(key, value, allowed):
    raise ConfigError(f"config `{key}`={value!r} is invalid; {allowed}.")


CXX_COMPILERS = ("g++", "c++", "clang++")  # what inductor's CPU backend can build with (or $CXX)


def _check_compile(value):
    if value is False:
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if value is not True and (not isinstance(value, str) or value not in backends):
        _fail("compile", value, f"expected true, false or a torch.compile backend: {', '.join(backends)}")
    compilers = [c for c in (os.environ.get("CXX"), *CXX_COMPILERS) if c]
    if value in (True, "inductor") and not torch.cuda.is_available() and not any(map(shutil.which, compilers)):
        _fail("compile", value, f"inductor needs a C++ compiler on CPU and none of {', '.join(compilers)} was "
                                "found: install one (or set $CXX), or train with compile: false")


def compile_backend(config):
    """The torch.compile backend of `config["compile"]`, or None for no compilation."""
    value = config["compile"]
    return "inductor" if value is True else (value or None)


def preset_path(name_or_path) -> Path:
    """The YAML file of a preset name (`tiny`, ...) or an existing path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {str(path)!r} (presets: {', '.join(PRESETS)})")
        return path
    if str(name_or_path) not in PRESETS:
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; presets: {', '.join(PRESETS)} "
                          f"(or a path to a .yaml file)")
    return CONFIG_DIR / f"{name_or_path}.yaml"


def load_preset(name, overrides=None) -> dict:
    """DEFAULTS updated with a preset (`tiny`, `small`, `125m`, `350m`) or a YAML file, then with `overrides`
    (`apply_overrides`); validated once, so a preset's own `out_dir` is never checked when an override replaces it."""
    path = preset_path(name)
    try:
        with open(path, encoding="utf-8") as f:
            preset = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: {problem}; a training config is a "
                          f"mapping of keys to values, like train/configs/tiny.yaml") from err
    if not isinstance(preset, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return resolve_config(apply_overrides(preset, overrides or {}))


def parse_value(text: str):
    """A command-line value as YAML (`3`, `true`, `null`, `{rope_type: yarn, factor: 4}`); `1e-3` is a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"the value {text!r} is not valid YAML ({getattr(err, 'problem', None) or err}); quote a "
                          "value with spaces or braces as one argument, e.g. --model.rope_parameters "
                          "'{rope_type: yarn, factor: 4}'") from err
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(config: dict, overrides: dict) -> dict:
    """Overrides `{"lr": 1e-3, "model.rope_parameters": {...}}` onto a copy of `config`; dotted keys go into `model`
    and `lora`. Unknown keys are caught by `resolve_config`."""
    config = dict(config)
    for key, value in overrides.items():
        key = key.replace("-", "_")
        section, _, field = key.partition(".")
        if field:
            if section not in ("model", "lora"):
                _fail(key, value, "only `model.FIELD` and `lora.FIELD` take dotted keys")
            current = config.get(section)
            if current is not None and not isinstance(current, (dict, bool)):
                _fail(section, current, "expected a mapping of fields (so that `--" + key + "` can set one)")
            config[section] = {**(current if isinstance(current, dict) else {}), field: value}
        else:
            config[key] = value
    return config


def _check_int(key, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"expected an integer >= {minimum}")


def _check_float(key, value, minimum=0.0, maximum=math.inf):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum:
        _fail(key, value, f"expected a number in [{minimum}, {maximum}]")


def _check_field(f, value):
    """The checks a key's type and `TrainConfig` metadata give it alone (the keys read together come after)."""
    if f.type is bool and not isinstance(value, bool):
        _fail(f.name, value, "expected true or false")
    if f.type is int:
        _check_int(f.name, value, f.metadata["minimum"])
    if f.type is float:
        _check_float(f.name, value, f.metadata.get("minimum", 0.0), f.metadata.get("maximum", math.inf))
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        _fail(f.name, value, f"allowed: {', '.join(f.metadata['choices'])}")


def _model_fields() -> set:
    from longctx import LongCtxConfig

    return set(LongCtxConfig.__annotations__)


def _check_model(config):
    model = config["model"]
    if not isinstance(model, dict):
        _fail("model", model, "expected a mapping of LongCtxConfig fields")
    allowed = _model_fields() - set(PIPELINE_MODEL_FIELDS)
    for field in model:
        if field in PIPELINE_MODEL_FIELDS:
            _fail(f"model.{field}", model[field], f"it is set from {PIPELINE_MODEL_FIELDS[field]}; leave it out")
        if field not in allowed:
            _fail(f"model.{field}", model[field], f"not a LongCtxConfig field; fields: {', '.join(sorted(allowed))}")
    if config["init_from"] is None:
        from longctx import LongCtxConfig

        try:  # the architecture is validated by LongCtxConfig itself, with a stand-in vocabulary
            model_config = LongCtxConfig(**model, vocab_size=max(config["vocab_size"], 300),
                                         max_position_embeddings=config["seq_len"])
        except ValueError as err:
            raise ConfigError(f"config `model`: {err}") from err
        check_context_parallel(config, model_config)


def check_context_parallel(config, model_config):
    """What context parallelism cannot split (train/context_parallel.py); with init_from, `setup` checks the loaded
    model's config the same way."""
    from .context_parallel import context_parallel_problems

    problems = context_parallel_problems(config, model_config) if config["context_parallel"] > 1 else []
    if problems:
        raise ConfigError(f"config `context_parallel`={config['context_parallel']}: " + "; ".join(problems))


def _check_lora(config):
    lora = config["lora"]
    if lora in (None, False):
        config["lora"] = None
        return
    if lora is True:
        lora = {}
    if not isinstance(lora, dict):
        _fail("lora", lora, "expected null, true or a mapping with keys " + ", ".join(LORA_DEFAULTS))
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        _fail(f"lora.{unknown[0]}", lora[unknown[0]], f"LoRA keys: {', '.join(LORA_DEFAULTS)}")
    lora = {**LORA_DEFAULTS, **lora}
    _check_int("lora.r", lora["r"], 1)
    _check_float("lora.alpha", lora["alpha"], 0.0)
    _check_float("lora.dropout", lora["dropout"], 0.0, 1.0)
    if importlib.util.find_spec("peft") is None:
        _fail("lora", lora, "LoRA needs the peft package: pip install 'longctx[lora]'")
    config["lora"] = lora


def _check_paths(config):
    source = config["init_from"]
    if source is not None:
        source = os.fspath(source)
        if not (os.path.isdir(source) or (source.endswith(".gguf") and os.path.isfile(source))):
            _fail("init_from", source, "expected an existing model directory or .gguf file")
        from longctx.files import check_model_source

        try:  # damaged files are found now, before out_dir is written
            check_model_source(source)
        except (ValueError, OSError) as err:
            raise ConfigError(f"config `init_from`={source!r}: {err}") from err
        config["init_from"] = source
    out_dir = Path(config["out_dir"]).expanduser()
    probe_dir = out_dir
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK | os.X_OK):
        _fail("out_dir", str(out_dir), f"{str(probe_dir)!r} is not a writable directory")
    config["out_dir"] = str(out_dir)


def resolve_config(config: dict) -> dict:
    """DEFAULTS filled in and every key checked; returns a new dict. Raises ConfigError."""
    if not isinstance(config, dict):
        raise ConfigError(f"a training config is a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        _fail(unknown[0], config[unknown[0]], f"unknown key; keys: {', '.join(DEFAULTS)}")
    config = {**DEFAULTS, **config}
    if config["model"] is not None and not isinstance(config["model"], dict):
        _fail("model", config["model"], "expected a mapping of LongCtxConfig fields")
    config["model"] = dict(config["model"] or {})
    for f in CONFIG_FIELDS:
        _check_field(f, config[f.name])
    span = config["copy_span"]
    if (not isinstance(span, (list, tuple)) or len(span) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                     for v in span)
            or not 1 <= span[0] <= span[1]
            or (config["copy_fraction"] > 0 and span[1] > config["seq_len"] // 2)):  # checked when used
        _fail("copy_span", span, f"expected [min, max] tokens with 1 <= min <= max <= seq_len / 2 = "
                                 f"{config['seq_len'] // 2}")
    config["copy_span"] = list(span)
    if config["lr"] <= 0:
        _fail("lr", config["lr"], "must be > 0")
    if config["min_lr"] > config["lr"]:
        _fail("min_lr", config["min_lr"], f"must be <= lr={config['lr']}")
    if config["warmup_steps"] > config["max_steps"]:
        _fail("warmup_steps", config["warmup_steps"], f"must be <= max_steps={config['max_steps']}")
    if config["seq_len"] % config["seq_len_multiple"]:
        _fail("seq_len", config["seq_len"], f"must be divisible by seq_len_multiple={config['seq_len_multiple']}")
    if config["batch_size"] % config["micro_batch_size"]:
        _fail("batch_size", config["batch_size"],
              f"must be divisible by micro_batch_size={config['micro_batch_size']} (times the number of processes)")
    from longctx.attention import check_attn_implementation

    try:  # flash-attn installed, and a GPU for it: known now, before anything is written
        check_attn_implementation(config["attn_implementation"])
    except (ImportError, ValueError) as err:
        _fail("attn_implementation", config["attn_implementation"], str(err).rstrip("."))
    _check_compile(config["compile"])
    if not isinstance(config["corpus"], str) or not config["corpus"]:
        _fail("corpus", config["corpus"], "expected a corpus name, a path or a hub dataset name")
    _check_paths(config)
    _check_lora(config)
    _check_model(config)
    return config


__all__ = ["DEFAULTS", "FLAGS", "PRESETS", "ConfigError", "TrainConfig", "apply_overrides", "check_context_parallel",
           "compile_backend", "config_help", "config_table", "load_preset", "parse_value", "preset_path", "resolve_config"]
