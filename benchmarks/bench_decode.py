"""Decoding against context length: tokens/s of cached one-token steps and the bytes the cache holds, for an
all-attention stack, a hybrid (lru, lru, lru, attention) and an all-LRU stack of the same width, and transformers'
`LlamaForCausalLM` with the all-attention stack's weights (`transformers`, its `DynamicCache` concatenating every
step; longctx appends in place, `longctx.cache.GrowingLayer`).

The context is prefilled in chunks of 4096 tokens (through the cache, as `generate` would after a long prompt);
then `--steps` single-token forwards are timed (median step) and the cache is measured from its tensors: keys and
values of the attention layers, the complex64 state of the LRU layers. 4 layers, hidden 128, 2 heads × 64, state
256, float32, batch 1, SDPA. `rerope`: the attention stack under ReRoPE (window 512, keys cached before RoPE) on its
fused path, `rerope_blockwise` on its block-wise path (`fused_rerope=False`).

Usage: python -m benchmarks.bench_decode [--contexts 1024 4096 16384 32768] [--steps 32] [--stacks attention ...]
"""

import argparse

import torch

from benchmarks.common import median, print_table, take_turns, write_results
from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.attention import attention_settings
from longctx.modeling_longctx import CACHE_FIELD, output_cache

SHAPE = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=4096, lru_state_size=256)
STACKS = {"transformers": None, "attention": ["attention"] * 4, "hybrid": ["lru", "lru", "lru", "attention"],
          "lru": ["lru"] * 4, "rerope": ["attention"] * 4, "rerope_blockwise": ["attention"] * 4}
RE_ROPE = {"rope_type": "rerope", "rerope_window": 512}  # the rerope stacks: keys cached before RoPE
SETTINGS = {"rerope_blockwise": {"fused_rerope": False}}  # `AttentionSettings` changes (rerope: the fused path)


def build(name):
    """The model of stack `name`; `transformers` is LlamaForCausalLM with the same weights as `attention`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.convert import from_llama

    torch.manual_seed(0)
    if name in ("transformers", "attention"):
        llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SHAPE.items() if k != "lru_state_size"},
                                             attn_implementation="sdpa")).eval()
        return llama if name == "transformers" else from_llama(llama).eval()
    rope = {"rope_parameters": RE_ROPE} if name.startswith("rerope") else {}
    return LongCtxForCausalLM(LongCtxConfig(**SHAPE, block_types=STACKS[name], **rope)).eval()


def cache_bytes(cache):
    """Bytes the cache's tensors hold: the storage under attention keys/values (a buffer with spare slots, for
    longctx's appending layer) and LRU recurrent states."""
    storages = {}
    for layer in cache.layers:
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None),
                   *getattr(layer, "recurrent_states", {}).values()]
        for tensor in tensors:
            if tensor is not None:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


@torch.no_grad()
def prefill(model, ids, chunk=4096):
    cache = None
    for start in range(0, ids.shape[1], chunk):
        cache = output_cache(model(ids[:, start:start + chunk], **{CACHE_FIELD: cache}, use_cache=True))
    return cache


@torch.no_grad()
def decode_row(context, steps, stacks=tuple(STACKS)):
    row = {"context": context}
    for name in stacks:
        model = build(name)
        ids = torch.randint(0, SHAPE["vocab_size"], (1, context + steps + 2))
        with attention_settings(**SETTINGS.get(name, {})):
            cache = prefill(model, ids[:, :context])
            position = iter(range(context, context + steps + 2))

            def step():
                t = next(position)
                model(ids[:, t:t + 1], **{CACHE_FIELD: cache}, use_cache=True)

            seconds = median(take_turns({name: step}, steps)[name])
        row[f"{name}_tok_s"] = 1 / seconds
        row[f"{name}_MiB"] = cache_bytes(cache) / 2**20
    for ratio, (a, b) in {"attention_vs_transformers": ("attention", "transformers"),
                          "rerope_vs_attention": ("rerope", "attention"),
                          "rerope_vs_blockwise": ("rerope", "rerope_blockwise")}.items():
        if a in stacks and b in stacks:
            row[ratio] = row[f"{a}_tok_s"] / row[f"{b}_tok_s"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per stack and context (median)")
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    args = parser.parse_args()
    rows = []
    for context in args.contexts:
        rows.append(decode_row(context, args.steps, args.stacks))
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    name = "decode" if args.stacks == list(STACKS) else "decode-" + "-".join(args.stacks)  # (a subset: its own file)
    print("wrote", write_results(name, rows, shape=SHAPE, stacks={s: STACKS[s] for s in args.stacks},
                                 steps=args.steps, rerope=RE_ROPE))


if __name__ == "__main__":
    main()
