"""Tensor parallelism through transformers' `tp_plan="auto"` (2 CPU processes, gloo): the sharded model computes what
the whole one does — logits, both losses, gradients, scoring, generation — tied or untied, as Llama does."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config_kwargs

from longctx import LongCtxConfig, LongCtxForCausalLM

WORKER = r"""
import json, sys, torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

model_dir, out = sys.argv[1], sys.argv[2]
sharded = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, tp_plan="auto")
whole = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
report = {"sharded_head": type(sharded.lm_head.weight).__name__}
with torch.no_grad():
    a, b = sharded(ids, labels=ids), whole(ids, labels=ids)
    report["logits"] = (a.logits - b.logits).abs().max().item()
    report["loss"] = abs(a.loss.item() - b.loss.item())
    report["scores"] = (sharded.score_tokens(ids)[0] - whole.score_tokens(ids)[0]).abs().max().item()
sharded.train(), whole.train()
fused_a, fused_b = sharded(ids, labels=ids).loss, whole(ids, labels=ids).loss  # training: the fused loss
fused_a.backward(), fused_b.backward()
report["fused_loss"] = abs(fused_a.item() - fused_b.item())
grad = sharded.lm_head.weight.grad
grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
report["head_grad"] = (grad - whole.lm_head.weight.grad).abs().max().item()
sharded.eval(), whole.eval()
kwargs = dict(attention_mask=mask[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0)
report["generate"] = torch.equal(sharded.generate(ids[:, :6], **kwargs), whole.generate(ids[:, :6], **kwargs))
if dist.get_rank() == 0:
    json.dump(report, open(out, "w"))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tie", [False, True])
def test_tp_plan_auto_on_two_processes_equals_one(tie, tmp_path):
    torch.manual_seed(0)
    LongCtxForCausalLM(LongCtxConfig(**tiny_config_kwargs(tie_word_embeddings=tie))).save_pretrained(tmp_path / "m")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(tmp_path / "worker.py"), str(tmp_path / "m"),
                          str(tmp_path / "report.json")], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sharded_head"] == "DTensor"  # the head (and with tie, the shared embedding) really is sharded
    for key in ("logits", "loss", "scores", "fused_loss", "head_grad"):
        assert report[key] <= 1e-5, (key, report)
    assert report["generate"]
