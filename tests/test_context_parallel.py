"""Context-parallel training (issue 17 item 3; train/context_parallel.py), as far as a CPU can check it.

torch's ring attention needs CUDA kernels, so no step runs here. What is checked: the schemes and settings that
cannot be split are refused by name; CPU processes and launches without FSDP2 are refused; the inputs are built on
the whole sequence, so torch's own load-balanced shards (`_HeadTailLoadBalancer`) keep every token's global position
and next-token target; and the per-process losses (shard sums over `targets_per_process`) average to the loss of the
whole batch — the loss of each shard taken from one full forward, which exact ring attention reproduces."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer

import train
from longctx.attention import active_attention_settings
from train.context_parallel import (IGNORE_INDEX, context_parallel_inputs, context_parallel_step,
                                    targets_per_process)
from train.loop import make_accelerator

REFUSED = {  # config overrides -> what the error must say
    "rerope": ({"model": {"rope_parameters": {"rope_type": "rerope", "rerope_window": 64}}},
               r"rope_type='rerope': ReRoPE's two score matrices run block-wise"),
    "dynamic": ({"model": {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}},
                r"rope_type='dynamic': dynamic NTK gives each query its own table"),
    "lru": ({"model": {"block_types": ["lru", "attention"], "num_hidden_layers": 2}},
            r"model.block_types: 'lru' at layers \[0\]: an LRU carries its state"),
    "logn-trained": ({"model": {"logn_scaling": "trained"}}, r"model.logn_scaling='trained': it counts the keys"),
    "eager": ({"attn_implementation": "eager"}, r"attn_implementation='eager': ring attention replaces SDPA"),
    "seq_len": ({"seq_len": 192, "seq_len_multiple": 64, "context_parallel": 5},
                r"seq_len=192: the load-balanced shards need a multiple of 2 × context_parallel = 10"),
}


def resolve(tmp_path, **overrides):
    return train.resolve_config({"out_dir": str(tmp_path / "run"), "context_parallel": 2, **overrides})


@pytest.mark.parametrize("name", REFUSED)
def test_what_cannot_be_split_is_refused_by_name(name, tmp_path):
    overrides, message = REFUSED[name]
    cp = overrides.get("context_parallel", 2)
    with pytest.raises(train.ConfigError, match=rf"config `context_parallel`={cp}: .*{message}"):
        resolve(tmp_path, **overrides)


def test_schemes_that_rotate_q_and_k_once_are_accepted(tmp_path):
    for rope in ({"rope_type": "yarn", "factor": 4.0}, {"rope_type": "ntk-mixed", "factor": 4.0},
                 {"rope_type": "linear", "factor": 2.0}):
        config = resolve(tmp_path, model={"rope_parameters": rope, "logn_scaling": "posthoc", "qk_bias": True})
        assert config["context_parallel"] == 2
    with pytest.raises(train.ConfigError, match="config `context_parallel`=0 is invalid; expected an integer >= 1"):
        resolve(tmp_path, context_parallel=0)


def test_cpu_processes_and_launches_without_fsdp2_are_refused(monkeypatch):
    with pytest.raises(train.ConfigError, match=r"context_parallel`=2 needs CUDA GPUs: .*use context_parallel: 1"):
        make_accelerator("no", context_parallel=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (as on a GPU machine: the launch is checked)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(train.ConfigError, match=r"needs FSDP2: launch with accelerate launch --use_fsdp --fsdp_vers"):
        make_accelerator("no", context_parallel=2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(train.ConfigError, match=r"context_parallel`=2 must divide the number of processes \(3\)"):
        make_accelerator("no", context_parallel=2)


def windows(batch=2, length=32, seed=0):
    """A batch of packed windows: positions restart at a document start inside the first row."""
    ids = torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(length).repeat(batch, 1)
    positions[0, 20:] -= 20
    return {"input_ids": ids, "position_ids": positions}


def shard_indices(length, cp):
    """The sequence indices of each process's shard, in torch's load-balanced layout: (cp, length / cp)."""
    return _HeadTailLoadBalancer(length, cp, "cpu")._generate_indices()[0].view(cp, -1)


@pytest.mark.parametrize("cp", [2, 4])
def test_the_shards_keep_global_positions_and_next_token_targets(cp):
    batch = windows()
    inputs = context_parallel_inputs(batch, "cpu")
    ids, positions = batch["input_ids"], batch["position_ids"]
    for rank, index in enumerate(shard_indices(32, cp)):
        shard = {name: value[:, index] for name, value in inputs.items()}  # what torch hands process `rank`
        assert torch.equal(shard["input_ids"], ids[:, index])
        assert torch.equal(shard["position_ids"], positions[:, index])  # global, restarts included
        for j, t in enumerate(index.tolist()):  # the target of token t is token t + 1, wherever that lies
            expected = ids[:, t + 1] if t + 1 < 32 else torch.full((2,), IGNORE_INDEX)
            assert torch.equal(shard["shift_labels"][:, j], expected)
    assert targets_per_process(inputs["shift_labels"], cp) == 2 * 31 / cp


@pytest.mark.parametrize("cp", [2, 4])
def test_the_per_process_losses_average_to_the_batch_loss(cp):
    """Each process's loss: its shard's target-loss sum over `targets_per_process`; their mean (FSDP's gradient mean,
    the logged loss) is the mean over every target, though the shard holding the last token has one target fewer."""
    model = tiny_model()
    batch = windows()
    inputs = context_parallel_inputs(batch, "cpu")
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         labels=batch["input_ids"]).loss
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        # the model's loss with the CP inputs, unsharded: the sum over the targets, over `num_items_in_batch`
        whole = model(**inputs, labels=inputs["shift_labels"], num_items_in_batch=7.0).loss
    nll = F.cross_entropy(logits.transpose(1, 2), inputs["shift_labels"], ignore_index=IGNORE_INDEX,
                          reduction="none")  # (batch, length), 0 at the ignored last position
    torch.testing.assert_close(whole, nll.sum() / 7.0)
    items = targets_per_process(inputs["shift_labels"], cp)
    per_process = [nll[:, index].sum() / items for index in shard_indices(32, cp)]
    counts = [(inputs["shift_labels"][:, index] != IGNORE_INDEX).sum() for index in shard_indices(32, cp)]
    assert len(set(map(int, counts))) == 2  # uneven: a plain per-shard mean would weigh the targets unequally
    torch.testing.assert_close(torch.stack(per_process).mean(), expected)


class ShardingAccelerator:
    """What `accelerator.maybe_context_parallel` does to its buffers on process `rank` of `cp`: each replaced in place
    by its shard (torch's layout)."""

    device = "cpu"

    def __init__(self, rank, cp):
        self.rank, self.cp, self.seen = rank, cp, None

    @contextlib.contextmanager
    def maybe_context_parallel(self, buffers, buffer_seq_dims, no_restore_buffers):
        assert buffer_seq_dims == [1] * len(buffers) and no_restore_buffers == set(buffers)
        index = shard_indices(buffers[0].shape[1], self.cp)[self.rank]
        for buffer in buffers:
            shard = buffer[:, index].clone()
            buffer.resize_(shard.shape).copy_(shard)
        self.seen = active_attention_settings().sdpa_gqa
        yield


def test_a_step_hands_the_model_its_shards_and_counts_targets_before_sharding():
    batch = windows()
    whole = context_parallel_inputs(batch, "cpu")
    accelerator = ShardingAccelerator(rank=1, cp=2)
    with context_parallel_step(accelerator, batch, 2) as inputs:
        index = shard_indices(32, 2)[1]
        for name in ("input_ids", "position_ids", "shift_labels"):
            assert torch.equal(inputs[name], whole[name][:, index])
        assert inputs["labels"] is inputs["shift_labels"] and inputs["num_items_in_batch"] == 31.0
        assert not active_attention_settings().sdpa_gqa  # key/value heads repeated for the ring attention's kernels
    assert accelerator.seen is False and active_attention_settings().sdpa_gqa
    assert torch.equal(batch["input_ids"], windows()["input_ids"])  # the caller's batch is not sharded
