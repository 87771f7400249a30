"""Context-parallel training (issue 17): each training sequence split over `context_parallel` processes.

accelerate's `ParallelismConfig(cp_size=…)` runs torch's context parallelism under FSDP2: inside
`accelerator.maybe_context_parallel(buffers=…)` each process holds a load-balanced shard of every buffer along the
sequence (head and tail chunks, torch's `_HeadTailLoadBalancer`), and SDPA's causal kernels become ring attention
over the shards. So the model sees only its shard, and everything that needs the whole sequence is computed before
sharding and sharded with it (`context_parallel_inputs`):

- the targets: `shift_labels`, the next token of every position, shifted on the whole sequence (a shard's last token's
  target lives on another shard);
- the positions: explicit `position_ids`, the global ones (RoPE, log-n posthoc and every frequency table read them);
- the loss: each process sums its shard's target losses and divides by the targets per process (`num_items_in_batch`),
  so FSDP's mean of the gradients over processes is the gradient of the global mean loss.

What cannot run under it (`context_parallel_problems`): attention that is not SDPA's full causal call — ReRoPE and
Leaky ReRoPE (two score matrices, block-wise in training), dynamic NTK (each query's own table), LRU blocks (a state
carried along the sequence, not exchanged between processes), log-n "trained" (it counts the keys a query sees, per
process), eager or flash-attn backends — and CPU processes (torch's ring attention dispatches SDPA's CUDA kernels).
"""

import contextlib

import torch

IGNORE_INDEX = -100


def context_parallel_problems(config: dict, model_config) -> list[str]:
    """Why `model_config` (a `LongCtxConfig`) cannot train under context_parallel = `config["context_parallel"]`,
    one line per reason (empty: it can)."""
    from longctx.rope import ROPE_SPECS

    cp = config["context_parallel"]
    problems = []
    rope_type = model_config.rope_parameters["rope_type"]
    if ROPE_SPECS[rope_type].keys_before_rope:
        kind = ("ReRoPE's two score matrices run block-wise" if ROPE_SPECS[rope_type].attention == "rerope"
                else "dynamic NTK gives each query its own table, block-wise")
        problems.append(f"model.rope_parameters.rope_type={rope_type!r}: {kind}, not as one SDPA call that ring "
                        "attention can split")
    lru = model_config.lru_layers()
    if lru:
        problems.append(f"model.block_types: 'lru' at layers {lru}: an LRU carries its state along the sequence, and "
                        "context parallelism does not pass it between processes")
    if model_config.logn_scaling == "trained":
        problems.append("model.logn_scaling='trained': it counts the keys each query sees, which a process knows only "
                        "for its own shard ('posthoc' reads the global positions and can)")
    if config["attn_implementation"] != "sdpa":
        problems.append(f"attn_implementation={config['attn_implementation']!r}: ring attention replaces SDPA's "
                        "kernels; use 'sdpa'")
    if config["seq_len"] % (2 * cp):
        problems.append(f"seq_len={config['seq_len']}: the load-balanced shards need a multiple of 2 × "
                        f"context_parallel = {2 * cp}")
    if config["lora"]:
        problems.append("lora: LoRA is not supported under FSDP")
    return problems


def context_parallel_inputs(batch, device) -> dict:
    """The model inputs of a batch of windows for a context-parallel step, built on the whole sequence before the
    shard: input_ids, the global position_ids, and shift_labels (token t+1 at t, IGNORE_INDEX at the last)."""
    input_ids = batch["input_ids"].to(device, copy=True)  # (copies: the shard replaces them in place)
    shift_labels = torch.full_like(input_ids, IGNORE_INDEX)
    shift_labels[:, :-1] = input_ids[:, 1:]
    return {"input_ids": input_ids, "position_ids": batch["position_ids"].to(device, copy=True),
            "shift_labels": shift_labels}


def targets_per_process(shift_labels, cp: int) -> float:
    """`num_items_in_batch` for one process of a context-parallel group: the targets of the whole (unsharded)
    micro-batch over the group's size. Each process's loss is then its shard's target-loss sum over this, and the mean
    over the group (FSDP's gradient mean; `accelerator.reduce(…, "mean")` for the logged loss) is the mean loss over
    every target — however unevenly the ignored targets fall among the shards."""
    return float((shift_labels != IGNORE_INDEX).sum()) / cp


@contextlib.contextmanager
def context_parallel_step(accelerator, batch, cp: int):
    """One micro-batch of a context-parallel step: yields the model's keyword inputs — input_ids, position_ids,
    shift_labels (and `labels`, which the loss needs present), `num_items_in_batch` — built on the whole sequence,
    then replaced in place by this process's shards inside `accelerator.maybe_context_parallel`. Run the forward and
    the backward inside the block (the ring attention's backward needs the context too). SDPA gets the key and value
    heads repeated (`sdpa_gqa=False`): the ring attention runs SDPA's kernels, which take equal head counts."""
    from longctx.attention import attention_settings

    inputs = context_parallel_inputs(batch, accelerator.device)
    items = targets_per_process(inputs["shift_labels"], cp)  # counted before the shard
    buffers = list(inputs.values())
    with attention_settings(sdpa_gqa=False), accelerator.maybe_context_parallel(
            buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers)):
        yield {**inputs, "labels": inputs["shift_labels"], "num_items_in_batch": items}


__all__ = ["context_parallel_inputs", "context_parallel_problems", "context_parallel_step", "targets_per_process"]
