"""Decoding against context length: tokens/s of cached one-token steps and the bytes the cache holds, for an
all-attention stack, a hybrid (lru, lru, lru, attention) and an all-LRU stack of the same width.

The context is prefilled in chunks of 4096 tokens (through the cache, as `generate` would after a long prompt);
then `--steps` single-token forwards are timed (median step) and the cache is measured from its tensors: keys and
values of the attention layers, the complex64 state of the LRU layers. 4 layers, hidden 128, 2 heads × 64, state
256, float32, batch 1, SDPA.

Usage: python -m benchmarks.bench_decode [--contexts 1024 4096 16384 32768] [--steps 32]
"""

import argparse

import torch

from benchmarks.common import median, print_table, take_turns, write_results
from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.modeling_longctx import output_cache

SHAPE = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=4096, lru_state_size=256)
STACKS = {"attention": ["attention"] * 4, "hybrid": ["lru", "lru", "lru", "attention"], "lru": ["lru"] * 4}


def cache_bytes(cache):
    """Bytes held by the cache's tensors: attention keys/values and LRU recurrent states."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
        total += sum(s.nbytes for s in getattr(layer, "recurrent_states", {}).values() if s is not None)
    return total


@torch.no_grad()
def prefill(model, ids, chunk=4096):
    cache = None
    for start in range(0, ids.shape[1], chunk):
        cache = output_cache(model(ids[:, start:start + chunk], cache=cache, use_cache=True))
    return cache


@torch.no_grad()
def decode_row(context, steps):
    row = {"context": context}
    for name, block_types in STACKS.items():
        torch.manual_seed(0)
        model = LongCtxForCausalLM(LongCtxConfig(**SHAPE, block_types=block_types)).eval()
        ids = torch.randint(0, SHAPE["vocab_size"], (1, context + steps + 2))
        cache = prefill(model, ids[:, :context])
        position = iter(range(context, context + steps + 2))

        def step():
            t = next(position)
            model(ids[:, t:t + 1], cache=cache, use_cache=True)

        seconds = median(take_turns({name: step}, steps)[name])
        row[f"{name}_tok_s"] = 1 / seconds
        row[f"{name}_MiB"] = cache_bytes(cache) / 2**20
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per stack and context (median)")
    args = parser.parse_args()
    rows = []
    for context in args.contexts:
        rows.append(decode_row(context, args.steps))
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    print("wrote", write_results("decode", rows, shape=SHAPE, stacks=STACKS, steps=args.steps))


if __name__ == "__main__":
    main()
