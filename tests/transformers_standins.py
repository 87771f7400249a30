"""longctx's own versions of the three helpers transformers' sdist leaves out (see transformers_suite.py).

- `GenerationTesterMixin`: generation checks written here, run on every generative class of a tester — Llama's
  and longctx's alike — each against an independent path (recomputation without a cache, the unpadded batch, the
  forward's own logits, eager decoding).
- `ExportTesterMixin`: `torch.export` of the base model's forward equals the eager forward.
- `config_common_kwargs`: every common `PreTrainedConfig` field with a value other than its default.
"""

import copy
import unittest

import torch
from transformers import CompileConfig, StaticCache

config_common_kwargs = {
    "output_hidden_states": True,
    "return_dict": False,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


def _ids(config, batch, length, seed=0):
    return torch.randint(3, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


class ExportTesterMixin:
    def test_torch_export(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.all_model_classes[0](copy.deepcopy(config)).eval()
        ids = _ids(config, 2, 9)
        with torch.no_grad():
            expected = model(ids, use_cache=False).last_hidden_state
            exported = torch.export.export(model, (ids,), {"use_cache": False}, strict=False)
            got = exported.module()(ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(got, expected)


class GenerationTesterMixin:
    """Generation, for each class in `all_generative_model_classes`; short prompts of a batch of 2."""

    max_new_tokens = 6

    def _generative(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        config = copy.deepcopy(config)
        config.pad_token_id = config.eos_token_id = None  # every row runs the full length (no early stop)
        for model_class in self.all_generative_model_classes:
            torch.manual_seed(0)
            yield config, model_class(config).eval()

    def _greedy(self, model, ids, **kwargs):
        kwargs = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.max_new_tokens, "do_sample": False,
                  "pad_token_id": 0, **kwargs}
        return model.generate(ids, **kwargs)

    def test_greedy_with_cache_equals_recomputation(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            self.assertTrue(torch.equal(self._greedy(model, ids), self._greedy(model, ids, use_cache=False)))

    def test_greedy_tokens_are_the_argmax_of_full_forwards(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            out = self._greedy(model, ids, return_dict_in_generate=True, output_scores=True)
            self.assertEqual(len(out.scores), self.max_new_tokens)
            for step, scores in enumerate(out.scores):
                prefix = out.sequences[:, :5 + step]
                with torch.no_grad():
                    logits = model(prefix, use_cache=False).logits[:, -1]
                torch.testing.assert_close(scores, logits, rtol=1e-4, atol=1e-4)
                self.assertTrue(torch.equal(out.sequences[:, 5 + step], logits.argmax(-1)))

    def test_beam_search_with_cache_equals_recomputation(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            kwargs = {"num_beams": 3, "num_return_sequences": 2}
            self.assertTrue(torch.equal(self._greedy(model, ids, **kwargs),
                                        self._greedy(model, ids, use_cache=False, **kwargs)))

    def test_sampling_is_reproducible_from_the_seed(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            runs = []
            for _ in range(2):
                torch.manual_seed(7)
                runs.append(self._greedy(model, ids, do_sample=True, top_k=10, temperature=0.8))
            self.assertTrue(torch.equal(*runs))

    def test_left_padding_changes_nothing(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 6)
            padded = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids], dim=1)
            mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], dim=1)
            with torch.no_grad():
                expected = model(ids).logits[:, -1]
                got = model(padded, attention_mask=mask).logits[:, -1]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            new = self._greedy(model, padded, attention_mask=mask)[:, 9:]
            self.assertTrue(torch.equal(new, self._greedy(model, ids)[:, 6:]))

    def test_generate_from_inputs_embeds_equals_from_ids(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            embeds = model.get_input_embeddings()(ids)
            new = self._greedy(model, None, inputs_embeds=embeds, attention_mask=torch.ones_like(ids))
            self.assertTrue(torch.equal(new, self._greedy(model, ids)[:, 5:]))

    def test_continuing_from_a_returned_cache_equals_one_call(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            full = self._greedy(model, ids)
            first = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                                   return_dict_in_generate=True)
            cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
            rest = self._greedy(model, first.sequences, max_new_tokens=self.max_new_tokens - 3,
                                min_new_tokens=self.max_new_tokens - 3, past_key_values=cache)
            self.assertTrue(torch.equal(rest, full))

    def test_static_cache_equals_dynamic_cache(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            self.assertTrue(torch.equal(self._greedy(model, ids, cache_implementation="static"),
                                        self._greedy(model, ids)))

    def test_compiled_static_cache_decoding_compiles_once_across_calls(self):
        if not getattr(self.all_generative_model_classes[0], "_can_compile_fullgraph", False):
            raise unittest.SkipTest("the model class does not declare _can_compile_fullgraph")
        compile_config = CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
        compile_config._compile_all_devices = True  # generate() compiles on CUDA only, unless told
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            expected = self._greedy(model, ids)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            for _ in range(2):
                got = self._greedy(model, ids, cache_implementation="static", compile_config=compile_config)
                self.assertTrue(torch.equal(got, expected))
            self.assertEqual(torch._dynamo.utils.counters["stats"]["unique_graphs"], 1)

    def test_a_static_cache_passed_in_equals_generate_building_it(self):
        for config, model in self._generative():
            ids = _ids(config, 2, 5)
            cache = StaticCache(config=config, max_cache_len=5 + self.max_new_tokens)
            self.assertTrue(torch.equal(self._greedy(model, ids, past_key_values=cache), self._greedy(model, ids)))

    def test_prompt_lookup_decoding_equals_greedy(self):
        for config, model in self._generative():
            if getattr(model, "_is_stateful", False):
                continue  # recurrent state cannot be rolled back: refused, as for transformers' recurrent models
            ids = _ids(config, 1, 5).repeat(1, 2)  # a prompt that repeats, so lookups find candidates
            self.assertTrue(torch.equal(self._greedy(model, ids, prompt_lookup_num_tokens=2),
                                        self._greedy(model, ids)))
