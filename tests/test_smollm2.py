"""The real SmolLM2-135M-Instruct GGUF: logits match transformers loading the same file, and greedy
decoding of the ChatML prompt answers "Paris"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from codellama_jax import load

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load(smollm2_gguf, dtype="float32")


def test_logits_match_transformers_on_the_same_gguf(smollm2, smollm2_gguf):
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    ids = smollm2.chat_template.encode(smollm2.tokenizer, QUESTION)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    ours = smollm2.logits([ids])[0]
    logit_range = float(expected.max() - expected.min())
    # both dequantize the same Q4_1/Q8_0 blocks to float32; what remains is float32 rounding,
    # which grows with the logits' magnitude: allow 1e-4 per unit of logit range
    diff = float(np.abs(ours - expected).max())
    print(f"max |Δlogits| = {diff:.2e} over a logit range of {logit_range:.1f}")
    assert diff <= 1e-4 * logit_range


def test_greedy_answer_is_paris(smollm2):
    ids = smollm2.chat_template.encode(smollm2.tokenizer, QUESTION)
    generated: list[int] = []
    for _ in range(10):  # recomputes the whole prefix each step; generation with a KV cache is generate()
        token = int(np.argmax(smollm2.logits([ids + generated])[0, -1]))
        if token in smollm2.stop_token_ids:
            break
        generated.append(token)
    assert "Paris" in smollm2.tokenizer.decode(generated)
