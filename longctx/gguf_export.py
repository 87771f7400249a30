"""GGUF out (issue 17): a longctx model as a llama.cpp `llama` GGUF file, float32, for the schemes llama.cpp computes.

llama.cpp's llama rotates by θ_i = freq_base^{-2i/d} / rope_freqs[i] when the file holds a `rope_freqs` tensor (its
per-pair frequency factors, how its converter writes Llama 3.1's scaling): every scheme that is one frequency table
and no attention temperature is that — PI, NTK-fixed, NTK-mixed and llama3 as per-pair divisors of longctx's own
table (methods.md §2, §4–5), NTK-aware as a base change (§3), default as it is. YaRN's temperature on cos/sin and
everything `convert.llama_export_problems` names (ReRoPE, log-n, longctx's dynamic NTK, LRU blocks) are refused.
q/k weights are permuted to llama.cpp's interleaved rotation layout, as its converter does; the tied modes go in as
`convert.llama_state_dict` folds them; projection biases are refused (transformers' GGUF reader, the check here,
drops them). `tokenizer`: a sentencepiece model (longctx's tokenizers)
written as llama.cpp's "llama" vocabulary; without one the file holds the weights only (transformers loads it, llama.cpp
needs a vocabulary).

Needs the `gguf` package (`pip install 'longctx[gguf]'`), imported here only.
"""

import os
import tempfile
from pathlib import Path

import torch

from .rope import ROPE_SPECS, compute_inv_freq

GGUF_ROPE_TYPES = ("default", "ntk", "linear", "ntk-fixed", "ntk-mixed", "llama3")
_LAYER_NAMES = {  # Llama's (after `model.layers.N.`) -> llama.cpp's (after `blk.N.`)
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_export_problems(config) -> list[str]:
    """What of `config` a llama.cpp llama GGUF cannot hold exactly, one line each (empty: none)."""
    from .convert import llama_export_problems

    problems = llama_export_problems(config)
    rope_type = config.rope_parameters["rope_type"]
    if ROPE_SPECS[rope_type].llama_export and rope_type not in GGUF_ROPE_TYPES:
        problems.append(f"rope_parameters.rope_type={rope_type!r}: YaRN scales cos/sin by its attention temperature, "
                        "which a rope_freqs table cannot carry; use to_llama and llama.cpp's convert_hf_to_gguf.py, "
                        "which writes llama.cpp's own YaRN keys")
    biases = [name for name in ("qk_bias", "attention_bias", "mlp_bias") if getattr(config, name, False)]
    if biases:
        problems.append(f"{', '.join(f'{name}=True' for name in biases)}: projection biases are not written, as "
                        "transformers' GGUF reader drops them and the file could not be checked; use to_llama")
    return problems


def rope_freqs(config):
    """llama.cpp's per-pair frequency factors (head_dim // 2,) float32 — base^{-2i/d} / inv_freq[i] — and the
    freq_base they divide, for `config`'s scheme; (None, base') where a base alone says it (default; NTK-aware's
    b·k^{d/(d−2)})."""
    rope = config.rope_parameters
    base, dim = float(rope["rope_theta"]), config.head_dim
    if rope["rope_type"] == "default":
        return None, base
    if rope["rope_type"] == "ntk":  # the base change to_llama writes (`convert.llama_rope_parameters`)
        from .convert import llama_rope_parameters

        return None, llama_rope_parameters(config, config.max_position_embeddings)["rope_theta"]
    plain = base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (plain / compute_inv_freq(config)[0].double()).float(), base


def _permute(weight, heads):
    """HF's half-split rotation layout -> llama.cpp's interleaved one (its converter's `permute`), rows per head."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(model) -> dict:
    """llama.cpp tensor name -> float32 numpy array of `model`'s weights (Llama's, `llama_state_dict`)."""
    from .convert import llama_state_dict

    config, out = model.config, {}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name, tensor in llama_state_dict(model).items():
        tensor = tensor.detach().float().cpu()
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            target = "output.weight"
        else:
            _, _, index, rest = name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
            module, kind = rest.rsplit(".", 1)
            short = _LAYER_NAMES[module]
            if short in heads:
                tensor = _permute(tensor, heads[short])
            target = f"blk.{index}.{short}.{kind}"
        out[target] = tensor.numpy()
    return out


def _add_vocabulary(writer, tokenizer):
    """A sentencepiece tokenizer as llama.cpp's "llama" vocabulary: pieces, scores, types (as its converter)."""
    import gguf
    import sentencepiece

    model_file = getattr(tokenizer, "vocab_file", None)
    if model_file is None or not os.path.isfile(model_file):
        raise ValueError("to_gguf: the tokenizer has no sentencepiece model file (vocab_file); pass a sentencepiece "
                         "tokenizer (longctx's, `longctx.data.load_tokenizer`) or none")
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    types = []
    for i in range(sp.get_piece_size()):
        kind = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                else gguf.TokenType.NORMAL)
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i).encode() for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(types)
    for add, value in ((writer.add_bos_token_id, sp.bos_id()), (writer.add_eos_token_id, sp.eos_id()),
                       (writer.add_unk_token_id, sp.unk_id()), (writer.add_pad_token_id, sp.pad_id())):
        if value >= 0:
            add(value)


def to_gguf(model, path, tokenizer=None, max_position_embeddings=None) -> Path:
    """Write `model` (a LongCtxForCausalLM) as a float32 llama.cpp `llama` GGUF file at `path`, atomically (a
    temporary file renamed). `max_position_embeddings` (llama.cpp's context_length) defaults to
    `convert.serving_length`. ValueError naming every part with no exact counterpart (`gguf_export_problems`)."""
    try:
        import gguf
    except ImportError as err:
        raise ImportError("to_gguf needs the gguf package: pip install 'longctx[gguf]'") from err

    from .convert import serving_length
    from .modeling_longctx import LongCtxForCausalLM

    if not isinstance(model, LongCtxForCausalLM):
        raise TypeError(f"to_gguf expects a LongCtxForCausalLM, got {type(model).__name__}")
    config = model.config
    problems = gguf_export_problems(config)
    if problems:
        raise ValueError("to_gguf: this model has no exact llama.cpp llama counterpart: " + "; ".join(problems)
                         + f". Exportable: rope_type in {', '.join(GGUF_ROPE_TYPES)}; logn_scaling='off'; attention "
                         "blocks only")
    path = Path(path)
    if path.suffix != ".gguf" or path.is_dir():
        raise ValueError(f"to_gguf: path={str(path)!r}; expected a file name ending in .gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    factors, base = rope_freqs(config)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(config.name_or_path or "longctx")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(max_position_embeddings or serving_length(config))
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(base)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if tokenizer is not None:
            _add_vocabulary(writer, tokenizer)
        for name, array in gguf_tensors(model).items():
            writer.add_tensor(name, array)
        if factors is not None:
            writer.add_tensor("rope_freqs.weight", factors.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


__all__ = ["GGUF_ROPE_TYPES", "gguf_export_problems", "gguf_tensors", "rope_freqs", "to_gguf"]
