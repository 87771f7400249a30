"""transformers' own common model tests (ModelTesterMixin from the installed release's sdist) and the generation
stand-ins, run on Llama and on longctx with the same tester, so that every longctx result reads beside Llama's.

Deliberate differences are listed in `DIFFERENCES` with the reason; each is a skip with that reason (README,
"transformers' common tests"). Everything else must pass as it does for Llama.
"""

import sys
import unittest

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

import transformers_suite
from longctx import LongCtxConfig, LongCtxForCausalLM, LongCtxModel

sys.path.insert(0, transformers_suite.import_path())
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin  # noqa: E402

from transformers_standins import GenerationTesterMixin  # noqa: E402

# transformers' tests assert on its deprecation warnings, which this project's pytest settings hide elsewhere
pytestmark = [pytest.mark.filterwarnings("always::FutureWarning"),
              pytest.mark.filterwarnings("always::DeprecationWarning")]

# test name -> why longctx differs from Llama by design (the test is skipped with this reason)
CAUSAL_DYNAMIC = ("dynamic NTK is causal in longctx: the rotary module gives the table at L_train and each query past "
                  "it gets the table of its own length inside the attention, so cached decoding equals recomputation "
                  "(README, 'Dynamic NTK and the KV cache'); transformers' module rescales every position by the "
                  "whole input's length")
DYNAMIC_L_TRAIN = ("dynamic NTK's L_train is rope_parameters['original_max_position_embeddings'] when set (SPEC §2); "
                   "the test leaves 16384 there from its first case, so nothing scales at 768 tokens (transformers' "
                   "dynamic reads max_position_embeddings)")
LRU_WEIGHTS = "LRU blocks have no attention weights: they return None in `attentions` (README, 'LRU blocks')"
TIED_MODES = ("tied_embedding_mode='half-swap' reparametrises a shared embedding: untying it is an error, not "
              "ignored (SPEC §2), and these tests untie it")
ALL_LONGCTX = {"test_model_rope_scaling_frequencies": CAUSAL_DYNAMIC,
               "test_model_rope_scaling_from_config_1_dynamic": DYNAMIC_L_TRAIN}
DIFFERENCES = {
    "LongCtxCommonTest": ALL_LONGCTX,
    "LongCtxYarnLognCommonTest": {**ALL_LONGCTX, "test_load_save_without_tied_weights": TIED_MODES,
                                  "test_model_forward_default_config_values": TIED_MODES},
    "LongCtxHybridCommonTest": {**ALL_LONGCTX, "test_attention_outputs": LRU_WEIGHTS,
                                "test_retain_grad_hidden_states_attentions": LRU_WEIGHTS},
}


@pytest.fixture(autouse=True, scope="module")
def longctx_in_transformers_name_tables():
    """transformers' tests find a class's role (base model, causal LM) in its static name tables, which hold only the
    library's own models; a registered custom model is entered there for the duration, as a library model would be."""
    from transformers.models.auto import modeling_auto

    tables = {"MODEL_MAPPING_NAMES": "LongCtxModel", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "LongCtxForCausalLM"}
    for table, name in tables.items():
        getattr(modeling_auto, table)["longctx"] = name
    yield
    for table in tables:
        getattr(modeling_auto, table).pop("longctx")


class DecoderTester:
    """A tiny decoder config and inputs, as transformers' CausalLMModelTester makes them (batch 13, 7 tokens)."""

    def __init__(self, parent, config_class, batch_size=13, seq_length=7, **overrides):
        self.parent, self.config_class = parent, config_class
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, True
        self.vocab_size, self.hidden_size, self.num_hidden_layers = 99, 32, 2
        self.num_attention_heads, self.num_key_value_heads = 2, 2
        self.config_kwargs = {**dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, hidden_act="gelu",
                                     max_position_embeddings=512, initializer_range=0.02, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2), **overrides}
        self.num_hidden_layers = self.config_kwargs["num_hidden_layers"]

    def get_config(self):
        return self.config_class(**self.config_kwargs)

    def prepare_config_and_inputs_for_common(self):
        ids = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_length))
        mask = torch.tril(torch.ones_like(ids))  # rows with 1..7 real tokens, padding on the right
        return self.get_config(), {"input_ids": ids, "attention_mask": mask}


class CommonTests(ModelTesterMixin, GenerationTesterMixin):
    config_class = None
    config_overrides = {}
    test_resize_embeddings = True

    def setUp(self):
        self.model_tester = DecoderTester(self, self.config_class, **self.config_overrides)
        self.config_tester = ConfigTester(self, config_class=self.config_class)
        for name, reason in DIFFERENCES.get(type(self).__name__, {}).items():
            if self._testMethodName == name:
                self.skipTest(f"deliberate difference: {reason}")

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        out = self.all_model_classes[0](config).eval()(**inputs)
        self.assertEqual(out.last_hidden_state.shape, (13, 7, 32))


class LlamaCommonTest(CommonTests, unittest.TestCase):
    config_class = LlamaConfig
    all_model_classes = (LlamaModel, LlamaForCausalLM)


class LongCtxCommonTest(CommonTests, unittest.TestCase):
    config_class = LongCtxConfig
    all_model_classes = (LongCtxModel, LongCtxForCausalLM)


class LongCtxYarnLognCommonTest(CommonTests, unittest.TestCase):
    """A long-context configuration: YaRN, trained log-n scaling, q/k bias, tied half-swapped embeddings."""

    config_class = LongCtxConfig
    all_model_classes = (LongCtxModel, LongCtxForCausalLM)
    config_overrides = dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
                            logn_scaling="trained", qk_bias=True, tie_word_embeddings=True,
                            tied_embedding_mode="half-swap")


class LongCtxHybridCommonTest(CommonTests, unittest.TestCase):
    """An LRU + attention stack."""

    config_class = LongCtxConfig
    all_model_classes = (LongCtxModel, LongCtxForCausalLM)
    config_overrides = dict(num_hidden_layers=2, block_types=["lru", "attention"], lru_state_size=16)


if __name__ == "__main__":
    pytest.main([__file__])
