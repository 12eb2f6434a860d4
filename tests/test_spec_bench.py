"""spec_bench.py: reading Spec-Bench rows, and the tie rule's measure of how far apart two logits are."""
import json

import pytest
import torch

import s3d
import spec_bench
from checkpoint import UsageError


def test_gap_in_ulps_counts_rounding_steps(tiny_checkpoint):
    """The tie rule's measure: 0 for AR's own token; for the runner-up, the logit gap over float32's spacing at
    that size (torch.nextafter, an independent computation of the rounding step)."""
    from checkpoint import load_model

    model = load_model(tiny_checkpoint)
    prompt = [1, 504, 2014, 30, 905]
    with torch.no_grad():
        ar = s3d.ar_generate(model, prompt, 3).tokens
        assert spec_bench.gap_in_ulps(model, prompt, ar, 1, ar[1]) == 0
        logits = model(torch.tensor([prompt + ar[:1]]), torch.arange(len(prompt) + 1))[0, -1]
        top = logits.topk(2)
        assert top.indices[0] == ar[1]
        step = (torch.nextafter(top.values[0], torch.tensor(float("inf"))) - top.values[0]).item()
        gap = spec_bench.gap_in_ulps(model, prompt, ar, 1, top.indices[1].item())
    assert gap == pytest.approx((top.values[0] - top.values[1]).item() / step, rel=1e-3)
    assert spec_bench.gap_in_ulps(model, prompt, ar, len(ar), 0) is None  # past AR's answer: nothing to compare


def test_read_spec_bench_takes_the_first_rows_of_each_category(tmp_path):
    rows = spec_bench.read_spec_bench(limit=2)
    categories = {r["category"] for r in rows}
    assert len(categories) >= 4 and all(sum(r["category"] == c for r in rows) == 2 for c in categories)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"category": "qa", "turns": "not a list"}) + "\n")
    with pytest.raises(UsageError, match="bad.jsonl:1: not a Spec-Bench row"):
        spec_bench.read_spec_bench(bad)


def test_read_spec_bench_takes_only_the_categories_asked_for():
    rows = spec_bench.read_spec_bench(limit=3, categories=["summarization", "qa"])
    assert sorted(r["category"] for r in rows) == ["qa"] * 3 + ["summarization"] * 3
    with pytest.raises(UsageError, match="--categories poetry: not in .* \\(it has .*summarization"):
        spec_bench.read_spec_bench(categories=["qa", "poetry"])
