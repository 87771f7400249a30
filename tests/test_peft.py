"""PEFT's default adapter targets for model_type "longctx" (Llama's: q_proj, v_proj), whichever of peft and longctx is
imported first, also for a checkpoint loaded with trust_remote_code where longctx is not installed."""

import subprocess
import sys

import pytest
import torch
from conftest import tiny_config_kwargs

from longctx import LongCtxConfig, LongCtxForCausalLM

pytest.importorskip("peft")

CHECK = r"""
import sys, torch
{imports}
from peft import LoraConfig, get_peft_model
model = {load}
adapted = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
names = {{n.split(".lora_A")[0] for n, _ in adapted.named_parameters() if "lora_A" in n}}
expected = {{f"base_model.model.model.layers.{{i}}.self_attn.{{p}}" for i in {attention} for p in ("q_proj", "v_proj")}}
assert names == expected, names
ids = torch.randint(0, 128, (1, 12))
with torch.no_grad():
    assert torch.equal(adapted(ids).logits, model(ids).logits)  # LoRA's B starts at zero
adapted(ids, labels=ids).loss.backward()
print("ok")
"""


def run_check(**fields):
    child = subprocess.run([sys.executable, "-c", CHECK.format(**fields)], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), child.stderr[-3000:]


def test_default_targets_with_longctx_imported_before_peft():
    run_check(imports="from longctx import LongCtxConfig, LongCtxForCausalLM",
              load="LongCtxForCausalLM(LongCtxConfig(vocab_size=128, hidden_size=64, intermediate_size=128, "
                   "num_hidden_layers=3, num_attention_heads=4, block_types=['attention', 'lru', 'attention'], "
                   "lru_state_size=16))", attention=(0, 2))


def test_default_targets_for_remote_code_loaded_after_peft(tmp_path):
    torch.manual_seed(0)
    LongCtxForCausalLM(LongCtxConfig(**tiny_config_kwargs(num_hidden_layers=2, block_types=["lru", "attention"],
                                                          lru_state_size=16))).save_pretrained(tmp_path)
    run_check(imports='import peft\nsys.modules["longctx"] = None  # not installed\n'
                      "from transformers import AutoModelForCausalLM",
              load=f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)",
              attention=(1,))
