"""Spec-Bench prompts (data/spec_bench_dev.jsonl, evaluation only) and the check that greedy speculative answers
are AR's: token for token, except where the target's two best logits are so close that the rounding of a 1-token
and a (g+1)-token forward decides between them (a tie, measured in rounding steps of the dtype).
"""
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

import s3d
from checkpoint import UsageError, read_text_file
from model import Transformer

SPEC_BENCH = Path(__file__).resolve().parent / "data" / "spec_bench_dev.jsonl"

# A greedy speculative answer may leave AR's only where the target's two best logits are within a few rounding
# steps (ulps) of its dtype: a tie that a 1-token forward (AR) and a (g+1)-token forward (verify) round differently.
# float32 hardly ever meets one; bfloat16 (8 significant bits, rounded after every layer) does every few hundred
# tokens. A wider gap is a wrong token: a bug.
TIE_ULPS = 4


def read_spec_bench(path: Path = SPEC_BENCH, limit: Optional[int] = None,
                    categories: Optional[list[str]] = None) -> list[dict]:
    """Rows {question_id, category, turns} of a Spec-Bench JSONL file, the first `limit` of each category (of
    `categories` only, when given)."""
    rows, seen, found = [], {}, set()
    for number, line in enumerate(read_text_file(path, "--prompts").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns, category = row["turns"], row["category"]
            assert isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise UsageError(f"{path}:{number}: not a Spec-Bench row (question_id, category, turns: [str, ...])") from None
        found.add(category)
        if categories is not None and category not in categories:
            continue
        if limit is None or seen.get(category, 0) < limit:
            seen[category] = seen.get(category, 0) + 1
            rows.append({"question_id": row.get("question_id", number), "category": category, "turns": turns})
    unknown = sorted(set(categories or []) - found)
    if unknown:
        raise UsageError(f"--categories {' '.join(unknown)}: not in {path} (it has {', '.join(sorted(found))})")
    if not rows:
        raise UsageError(f"{path} has no prompts")
    return rows


def is_tie(record: dict) -> bool:
    return record["gap_ulps"] is not None and record["gap_ulps"] <= TIE_ULPS


def gap_in_ulps(model: Transformer, prompt: list[int], ar_tokens: list[int], i: int, other: int) -> Optional[float]:
    """How far apart the target's logits for AR's token i and for `other` are, in rounding steps of the model's
    dtype at their size, from one forward of the prompt and AR's answer before token i."""
    if i >= len(ar_tokens):
        return None
    tokens, device = prompt + ar_tokens[:i], model.output.weight.device
    s3d.prepare_cache(model, len(tokens))
    logits = model(torch.tensor([tokens], device=device), torch.arange(len(tokens), device=device))[0, -1].float()
    a, b = logits[ar_tokens[i]].item(), logits[other].item()
    ulp = torch.finfo(model.tok_embeddings.weight.dtype).eps * 2.0 ** math.floor(math.log2(max(abs(a), abs(b), 1e-30)))
    return abs(a - b) / ulp


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where a and b differ (the shorter length if one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def same_as_ar(f: dict) -> str:
    """'19/19', or '4/19 + 15 ties' when some answers left AR's at a tie (TIE_ULPS)."""
    return f"{f['matches_ar']}/{f['answers']}" + (f" + {f['ties']} ties" if f.get("ties") else "")


def report_mismatches(records: list[dict], mismatches: list[dict], dtype: str) -> None:
    ties = [r for r in records if is_tie(r)]
    if ties:
        print(f"{len(ties)} greedy speculative answers left AR's at a tie: the target's two logits within "
              f"{max(r['gap_ulps'] for r in ties):.0f} rounding steps of {dtype} (the limit is {TIE_ULPS})",
              file=sys.stderr)
    for m in mismatches:
        gap = "" if m["gap_ulps"] is None else f", where the target's logits are {m['gap_ulps']:.0f} ulps apart"
        print(f"MISMATCH: {m['method']} differs from AR on question {m['question_id']} turn {m['turn']} "
              f"({m['category']}) from new token {m['first_difference']}{gap}", file=sys.stderr)
