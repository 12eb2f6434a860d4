"""End to end on the real embedded default (SmolLM2-135M-Instruct): our fp32 greedy output equals that of
transformers loading the same GGUF file, token for token."""
import json
import os
from dataclasses import asdict

import pytest
import torch

import s3d
from conftest import ROOT
from cli import load
from heads import load_heads, new_heads
from model import ModelArgs, Transformer

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


# ---------------------------------------------------------------------------------------------------------------
# Greedy losslessness of speculative decoding on the real model and real prompts. CI runs 3 prompts per draft kind
# (2 for the slowest two); S3D_LOSSLESS_PROMPTS=30 runs the full check (about 25 minutes on a 2-core CPU), with the
# same assertions.

LOSSLESS_PROMPTS = int(os.environ.get("S3D_LOSSLESS_PROMPTS", "3"))


SHIPPED_HEADS = ROOT / "heads" / "smollm2-135m-instruct.safetensors"


def spec_bench_prompts(tok, n):
    rows = [json.loads(line) for line in (ROOT / "data" / "spec_bench_dev.jsonl").read_text().splitlines()]
    picked = rows[:: max(1, len(rows) // n)][:n]  # spread over the categories
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}])) for r in picked]


def small_draft_model(model, keep=(*range(10), *range(20, 30))) -> Transformer:
    """A separate, smaller model (own weights, own cache) made of 20 of the target's 30 layers: a stand-in for a
    small draft model sharing the tokenizer, which the embedded default does not come with. (With fewer layers
    nearly every draft is rejected, which would leave the acceptance path untested.)"""
    config = ModelArgs(**{**asdict(model.config), "n_layer": len(keep)})
    draft = Transformer(config)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("layers.", "heads."))}
    for new, old in enumerate(keep):
        state |= {k.replace(f"layers.{old}.", f"layers.{new}.", 1): v.clone()
                  for k, v in model.state_dict().items() if k.startswith(f"layers.{old}.")}
    draft.load_state_dict(state, strict=False)
    return draft.eval()


def top2_gap(model, tokens: list[int], at: int) -> float:
    """The target's top-1 minus top-2 logit for the token at index `at`, given tokens[:at]."""
    with torch.no_grad():
        model.setup_caches(1, len(tokens) + 8)
        logits = model(torch.tensor([tokens[:at]]), torch.arange(at))[0, -1]
    top = logits.topk(2).values
    return (top[0] - top[1]).item()


@pytest.fixture(scope="module")
def lossless_setup(ours):
    model, tok = ours
    prompts = spec_bench_prompts(tok, LOSSLESS_PROMPTS)
    with torch.no_grad():
        ar = [s3d.ar_generate(model, p, 128, eos_ids=tok.eos_ids).tokens for p in prompts]
    return model, tok, prompts, ar


@pytest.mark.parametrize("kind", ["s3d", "s3d-trained", "s3d-trained-lookup", "skip", "model"])
def test_greedy_speculative_equals_ar_on_spec_bench(lossless_setup, kind):
    model, tok, prompts, ar_outputs = lossless_setup
    if kind in ("model", "skip"):  # (the two slowest drafts: one prompt fewer, to keep the suite short)
        prompts, ar_outputs = prompts[:max(1, LOSSLESS_PROMPTS - 1)], ar_outputs[:max(1, LOSSLESS_PROMPTS - 1)]
    heads = {"s3d": lambda: new_heads(model, (10, 20), 4, 8),
             "s3d-trained": lambda: load_heads(SHIPPED_HEADS, model.config)}.get(kind.removesuffix("-lookup"),
                                                                                 lambda: None)()
    model.set_heads(heads)
    draft, lookup = kind.removesuffix("-lookup").removesuffix("-trained"), 4 * kind.endswith("-lookup")
    draft_model = small_draft_model(model) if draft == "model" else None
    near_ties, taus = [], []
    with torch.no_grad():
        for prompt, ar in zip(prompts, ar_outputs):
            spec = s3d.speculative_generate(model, prompt, 128, s3d.Draft(draft, 4, (10, 20), draft_model,
                                                                          lookup=lookup), eos_ids=tok.eos_ids)
            taus.append(s3d.mean_tokens_per_iteration(spec.accepted))
            if spec.tokens != ar:
                i = next(i for i, (a, b) in enumerate(zip(spec.tokens, ar)) if a != b)
                gap = top2_gap(model, prompt + ar, len(prompt) + i)
                assert gap < 1e-4, f"{kind}: differs from AR at token {i} where the top-2 gap is {gap:.2e}"
                near_ties.append((i, gap))
    model.set_heads(None)
    print(f"\n{kind}: {len(prompts)} prompts, tau {sum(taus) / len(taus):.2f}, near-ties {near_ties or 'none'}")
    assert len(near_ties) <= len(prompts) // 10, f"too many near-ties: {near_ties}"
