"""Create a tiny longctx model, save it, reload it with trust_remote_code (as a user without longctx would), generate."""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

from longctx import LongCtxConfig, LongCtxForCausalLM


def main():
    torch.manual_seed(0)
    config = LongCtxConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           rope_parameters={"rope_type": "ntk-mixed", "factor": 8.0})
    model = LongCtxForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 8))
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        print(f"saved to {directory}: config.json auto_map = {model.config.auto_map}")
        reloaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        same = torch.equal(model(prompt).logits, reloaded(prompt).logits)
        tokens = reloaded.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    print(f"reloaded {type(reloaded).__name__} from its own source; identical logits: {same}")
    print("generated:", tokens[0, prompt.shape[1]:].tolist())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
