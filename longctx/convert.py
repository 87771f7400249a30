"""Llama-family checkpoints in (a `LlamaForCausalLM`, a directory of one, or a GGUF file -> `LongCtxForCausalLM`) and
out (`to_llama`: a plain `LlamaForCausalLM` directory for stock engines, where the scheme is one Llama computes).

The parameter names are Llama's, so the state dict moves over unchanged and the logits equal the source's.
"""

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .configuration_longctx import LongCtxConfig, original_max_positions
from .files import check_model_source
from .modeling_longctx import LongCtxForCausalLM
from .rope import ROPE_SPECS, compute_inv_freq

_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_bias",
    "attention_dropout", "mlp_bias",
)


def load_llama(src, dtype=None):
    """A `LlamaForCausalLM` from a model directory or a `.gguf` file (transformers de-quantizes GGUF to `dtype`)."""
    from transformers import LlamaForCausalLM

    src = os.fspath(src)
    kind = check_model_source(src)  # damaged or unsupported files: one line naming the file, before loading
    if kind == "gguf":
        return LlamaForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(src)), gguf_file=os.path.basename(src),
                                                dtype=dtype or torch.float32)
    return LlamaForCausalLM.from_pretrained(src, dtype=dtype or "auto", use_safetensors=True)


def llama_to_longctx_config(llama_config, **config_overrides) -> LongCtxConfig:
    """LongCtxConfig with the Llama config's architecture; overrides (e.g. `rope_parameters`) win."""
    if getattr(llama_config, "model_type", "llama") not in ("llama", "longctx"):
        raise ValueError(f"from_llama expects a Llama-architecture model, got model_type={llama_config.model_type!r}")
    fields = {k: getattr(llama_config, k) for k in _LLAMA_FIELDS if getattr(llama_config, k, None) is not None}
    fields["rope_parameters"] = dict(fields.get("rope_parameters") or {})
    fields.update(config_overrides)
    return LongCtxConfig(**fields)


def from_llama(src, **config_overrides) -> LongCtxForCausalLM:
    """Convert `src` (LlamaForCausalLM, directory or GGUF path) to a LongCtxForCausalLM with the same weights."""
    from transformers import LlamaForCausalLM

    llama = src if isinstance(src, LlamaForCausalLM) else load_llama(src)
    config = llama_to_longctx_config(llama.config, **config_overrides)
    config._attn_implementation = llama.config._attn_implementation or "sdpa"
    dtype = next(llama.parameters()).dtype
    model = LongCtxForCausalLM(config).to(dtype)
    state = {k: v for k, v in llama.state_dict().items() if "rotary_emb" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    # parameters Llama lacks (q/k bias, output projection via overrides) keep their init: zero bias, orthogonal P
    missing = set(missing) - tied - {n for n, _ in model.named_parameters() if "output_projection" in n or ".bias" in n}
    if missing or unexpected:
        raise ValueError(f"from_llama: state dicts differ; missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval() if not llama.training else model


# --- Llama checkpoints out (issue 17): the schemes transformers' own Llama computes exactly --------------------------

# How each rope_type is written in transformers' own (`RopeSpec.llama_export`, `stock_keys`, `export_refusal`).
EXPORTED_ROPE_TYPES = tuple(name for name, spec in ROPE_SPECS.items() if spec.llama_export)
EXPORTABLE = ("rope_type in " + ", ".join(EXPORTED_ROPE_TYPES) + "; logn_scaling='off'; "
              "attention blocks only; any qk_bias, attention_bias and tied_embedding_mode")


def llama_export_problems(config) -> list[str]:
    """What of `config` has no exact counterpart in transformers' LlamaForCausalLM, one line each (empty: none)."""
    problems = []
    spec = ROPE_SPECS[config.rope_parameters["rope_type"]]
    if spec.llama_export is None:
        problems.append(f"rope_parameters.rope_type={spec.name!r}: {spec.export_refusal}")
    if config.logn_scaling != "off":
        problems.append(f"logn_scaling={config.logn_scaling!r}: log-n attention scaling multiplies each query by a "
                        "length-dependent factor (methods.md §6); Llama's attention has a fixed 1/sqrt(head_dim)")
    lru = config.lru_layers()
    if lru:
        problems.append(f"block_types: 'lru' at layers {lru}: Llama has attention layers only (the LRU is a "
                        "recurrent mixer, methods.md §13)")
    return problems


def serving_length(config) -> int:
    """max_position_embeddings for the exported config (engines cap a context at it): the model's, or L_train·k where
    a scaled scheme reaches further."""
    rope = config.rope_parameters
    if not ROPE_SPECS[rope["rope_type"]].needs_factor:
        return config.max_position_embeddings
    return max(config.max_position_embeddings, math.ceil(original_max_positions(config) * rope["factor"]))


def llama_rope_parameters(config, max_position_embeddings: int) -> dict:
    """`config.rope_parameters` in transformers' own rope types: stock types as they are; NTK-aware as rope_theta
    b·k^{d/(d−2)} (methods.md §3); NTK-fixed / mixed as `longrope` with short = long factors = the divisors
    b^{-2i/d} / inv_freq[i] and attention_factor 1 (methods.md §4–5)."""
    rope = config.rope_parameters
    rope_type, base, dim = rope["rope_type"], float(rope["rope_theta"]), config.head_dim
    spec = ROPE_SPECS[rope_type]
    if spec.llama_export == "as-is":
        stock = {"rope_type": rope_type, "rope_theta": base}
        stock.update({key: rope[key] for key in spec.stock_keys if rope.get(key) is not None})
        if "original_max_position_embeddings" in spec.stock_keys:
            stock["original_max_position_embeddings"] = original_max_positions(config)
        return stock
    if spec.llama_export == "base-change":  # the same float as longctx.rope.ntk_rope's base
        return {"rope_type": "default", "rope_theta": base * rope["factor"] ** (dim / (dim - 2))}
    if spec.llama_export != "longrope":
        raise ValueError(f"llama_rope_parameters: rope_type={rope_type!r} has no exact transformers rope type; "
                         f"allowed: {', '.join(EXPORTED_ROPE_TYPES)}")
    # transformers computes 1 / (divisor · b^{2i/d}) in float32: longctx's table to an ulp (a float32 reciprocal does
    # not reach every float32, so not always bit for bit)
    powers = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)  # b^{2i/d}, as transformers has it
    divisors = (1.0 / (powers.double() * compute_inv_freq(config)[0].double())).tolist()
    # factor 1 and original = max_position_embeddings: no attention scaling in transformers nor in engines that
    # derive it from max / original; short == long: one table at every length
    return {"rope_type": "longrope", "rope_theta": base, "short_factor": divisors, "long_factor": list(divisors),
            "factor": 1.0, "attention_factor": 1.0, "original_max_position_embeddings": max_position_embeddings}


def llama_config(config, max_position_embeddings=None):
    """The LlamaConfig computing what `config` computes; ValueError naming every part that has no exact counterpart
    (`llama_export_problems`)."""
    from transformers import LlamaConfig

    problems = llama_export_problems(config)
    if problems:
        raise ValueError("to_llama: this model has no exact LlamaForCausalLM counterpart: " + "; ".join(problems)
                         + f". Exportable: {EXPORTABLE}.")
    length = serving_length(config) if max_position_embeddings is None else max_position_embeddings
    fields = {k: getattr(config, k) for k in _LLAMA_FIELDS if getattr(config, k, None) is not None}
    mode = config.tied_embedding_mode if config.tie_word_embeddings else "plain"
    fields.update(max_position_embeddings=length, rope_parameters=llama_rope_parameters(config, length),
                  attention_bias=config.attention_bias or config.qk_bias,  # Llama's bias is all four or none
                  # small-init is only an initialisation; projection and half-swap become an untied lm_head
                  tie_word_embeddings=config.tie_word_embeddings and mode in ("plain", "small-init"))
    return LlamaConfig(**fields)


def llama_state_dict(model) -> dict:
    """`model`'s weights under Llama's names, what Llama lacks folded in exactly: zero v/o biases beside a q/k bias
    (methods.md §11); the projected or half-swapped tied head as an untied `lm_head` (methods.md §12)."""
    config = model.config
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("output_projection.")}
    if config.qk_bias and not config.attention_bias:
        for name, weight in list(state.items()):
            if name.endswith(("self_attn.v_proj.weight", "self_attn.o_proj.weight")):
                state[name[:-len("weight")] + "bias"] = weight.new_zeros(weight.shape[0])
    mode = config.tied_embedding_mode if config.tie_word_embeddings else "plain"
    embedding = state["model.embed_tokens.weight"]
    if mode == "projection":  # logits = (h Pᵀ) Eᵀ = h (E P)ᵀ
        projection = model.output_projection.weight.detach()
        state["lm_head.weight"] = (embedding.double() @ projection.double()).to(embedding.dtype)
    elif mode == "half-swap":  # [h2, h1] · E_v = h · [E_v[d/2:], E_v[:d/2]]
        first, second = embedding.chunk(2, dim=-1)
        state["lm_head.weight"] = torch.cat((second, first), dim=-1)
    elif config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied again in the Llama model
    return state


def _check_out_dir(out_dir: Path):
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                       and not (out_dir / "config.json").exists())):
        raise ValueError(f"to_llama: out_dir={str(out_dir)!r} exists and is not a model directory (no config.json); "
                         "expected a new or empty directory, or a model directory to replace")


def _publish(tmp: Path, out_dir: Path):
    """Replace `out_dir` by the finished `tmp` (a rename: readers see the old directory or the new, never half)."""
    old = out_dir.with_name(f".old-{out_dir.name}")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def to_llama(model, out_dir, tokenizer=None, max_position_embeddings=None) -> Path:
    """Write `model` (a LongCtxForCausalLM) as a plain LlamaForCausalLM directory: config.json with model_type "llama"
    and no auto_map, safetensors weights, `tokenizer` beside them. transformers loads it without remote code, with the
    same logits; engines reading Llama checkpoints (vLLM, TGI, llama.cpp's converter) read its rope type.

    `max_position_embeddings` (the length engines allow) defaults to `serving_length`. Raises ValueError naming every
    part of the model with no exact Llama counterpart (ReRoPE, log-n scaling, LRU blocks, longctx's dynamic NTK)."""
    from transformers import LlamaForCausalLM

    if not isinstance(model, LongCtxForCausalLM):
        raise TypeError(f"to_llama expects a LongCtxForCausalLM, got {type(model).__name__}")
    config = llama_config(model.config, max_position_embeddings)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    with torch.device("meta"):  # no second copy of the weights: the Llama model takes longctx's tensors
        llama = LlamaForCausalLM(config)
    missing, unexpected = llama.load_state_dict(llama_state_dict(model), strict=False, assign=True)
    missing = set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or unexpected:
        raise ValueError(f"to_llama: state dicts differ; missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        llama.tie_weights()
    if model.generation_config is not None:
        llama.generation_config = copy.deepcopy(model.generation_config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".tmp-{out_dir.name}-"))
    try:
        llama.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv=None):
    """`python -m longctx.convert to-llama SRC OUT` (a Llama model directory) or `to-gguf SRC OUT.gguf` (a llama.cpp
    file): a longctx model directory and its tokenizer."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m longctx.convert", description="Convert longctx checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("to-llama", help="write a plain LlamaForCausalLM directory (see to_llama)")
    export.add_argument("src", help="a longctx model directory")
    export.add_argument("out", help="the Llama model directory to write")
    export.add_argument("--max-position-embeddings", type=int, default=None, help="default: serving_length")
    gguf = commands.add_parser("to-gguf", help="write a float32 llama.cpp GGUF file (see gguf_export.to_gguf)")
    gguf.add_argument("src", help="a longctx model directory")
    gguf.add_argument("out", help="the .gguf file to write")
    gguf.add_argument("--max-position-embeddings", type=int, default=None, help="default: serving_length")
    args = parser.parse_args(argv)
    from .data import TOKENIZER_FILES, load_tokenizer

    if check_model_source(args.src) != "longctx":
        parser.error(f"{args.src} is not a longctx model directory (its config.json has another model_type)")
    model = LongCtxForCausalLM.from_pretrained(args.src, dtype="auto", use_safetensors=True)
    has_tokenizer = any(os.path.exists(os.path.join(args.src, name)) for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(args.src) if has_tokenizer else None
    rope_type = model.config.rope_parameters["rope_type"]
    try:
        if args.command == "to-gguf":
            from .gguf_export import to_gguf

            out = to_gguf(model, args.out, tokenizer=tokenizer, max_position_embeddings=args.max_position_embeddings)
            print(f"wrote {out} (llama.cpp llama, float32, rope_type={rope_type!r})")
            return
        out = to_llama(model, args.out, tokenizer=tokenizer, max_position_embeddings=args.max_position_embeddings)
    except (ValueError, ImportError) as err:  # not exportable, a bad destination, no gguf: one message, no traceback
        parser.error(str(err))
    print(f"wrote {out} (LlamaForCausalLM, rope_type={rope_type!r} as "
          f"{json.loads((out / 'config.json').read_text())['rope_parameters']['rope_type']!r})")


__all__ = ["from_llama", "llama_config", "llama_export_problems", "llama_rope_parameters", "llama_state_dict",
           "load_llama", "llama_to_longctx_config", "serving_length", "to_llama"]

if __name__ == "__main__":
    main()
