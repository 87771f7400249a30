"""bfloat16 against float32 on a trained model: perplexity and forward time on held-out text.

The precision proof for longctx's bf16 CPU path (issue 6: perplexity within 0.5% of float32). The same windows of
the held-out Shakespeare test split (whole documents, never trained on), scored three ways with
`LongCtxForCausalLM.score_tokens`: float32; bfloat16 as longctx runs it (attention by `blocked_attention`, scores
rounded to bf16); bfloat16 through torch's SDPA kernel (what transformers runs). Time: one pass over the windows.

Usage: python -m benchmarks.bench_precision [--model default | DIR | GGUF] [--length 4096] [--windows 2]
"""

import argparse
import math
import time

import torch

from benchmarks.common import print_table, write_results
from eval.models import load_model
from longctx import attention
from longctx.data import corpus_splits


def perplexity(model, windows):
    start, nll = time.perf_counter(), 0.0
    with torch.no_grad():
        for window in windows:
            nll += float(model.score_tokens(window[None])[0].double().sum())
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="default (the embedded tiny model), a directory or a GGUF")
    parser.add_argument("--length", type=int, default=4096, help="tokens per window")
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    text = "\n\n".join(corpus_splits("shakespeare")["test"])
    ids = tokenizer(text)["input_ids"][: args.length * args.windows]
    if len(ids) < args.length * args.windows:
        raise SystemExit(f"the held-out text has {len(ids)} tokens; lower --length or --windows")
    windows = torch.tensor(ids).view(args.windows, args.length)
    reference, reference_s = perplexity(model, windows)
    rows = [{"precision": "float32", "attention": "sdpa", "perplexity": reference, "vs_fp32_pct": 0.0,
             "seconds": reference_s}]
    model = model.to(torch.bfloat16)
    ours, ours_s = perplexity(model, windows)
    with attention.attention_settings(blocked_queries=(2**62, 0)):  # never `blocked_attention`: torch's kernel
        theirs, theirs_s = perplexity(model, windows)
    for label, ppl, seconds in (("blocked (longctx)", ours, ours_s), ("torch sdpa", theirs, theirs_s)):
        rows.append({"precision": "bfloat16", "attention": label, "perplexity": ppl,
                     "vs_fp32_pct": 100 * (ppl / reference - 1), "seconds": seconds})
    print_table(rows, list(rows[0]))
    print("wrote", write_results(f"precision_{loaded.name}", rows, model=loaded.name, length=args.length,
                                 windows=args.windows, target="bf16 perplexity within 0.5% of float32"))


if __name__ == "__main__":
    main()
