"""End to end on the real embedded default (SmolLM2-135M-Instruct): our fp32 greedy output equals that of
transformers loading the same GGUF file, token for token."""
import pytest
import torch

import s3d
from generate import load
from tokenizer import Tokenizer

PROMPTS = ["Write a short story about a robot who learns to paint.",
           "What are the three primary colors? Explain briefly.",
           "Translate to French: The weather is nice today and we are going to the beach."]


@pytest.fixture(scope="module")
def hf_reference(default_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(default_gguf.parent), default_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def ours(default_checkpoint):
    return load(default_checkpoint, torch.device("cpu"), torch.float32)


def test_tokenizer_matches_transformers(hf_reference, ours):
    _, hf_tok = hf_reference
    _, tok = ours
    for prompt in PROMPTS + ["Digits 12345, émojis 🤖 and  double  spaces\n\ttabs."]:
        messages = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages)
        assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(hf_reference, ours, prompt):
    hf, _ = hf_reference
    model, tok = ours
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=sorted(tok.eos_ids),
                          pad_token_id=tok.eos_ids and min(tok.eos_ids))[0, len(ids):].tolist()
    result = s3d.ar_generate(model, ids, 64, eos_ids=tok.eos_ids).tokens
    assert result == ref, f"first difference at {next(i for i, (a, b) in enumerate(zip(result, ref)) if a != b)}"
    assert len(result) >= 16  # a real continuation, not an immediate EOS


def test_reference_answer_from_design_doc(ours):
    model, tok = ours
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}]))
    text = tok.decode(s3d.ar_generate(model, ids, 20, eos_ids=tok.eos_ids).tokens)
    assert text.startswith('As the AI, AI-powered robot, "Pixel," began its journey of self-discovery')
