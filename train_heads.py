"""Training the S3D heads (mask embeddings + low-rank adapters) by self-distillation from the frozen target.

    python train_heads.py --out heads/smollm2-135m-instruct.safetensors    # the embedded default, skip 10:20, g 4

1. Data (generate_data): the target answers data/train_prompts.jsonl through its chat template, one greedy answer
   and --samples - 1 sampled ones per prompt, several prompts per batch. Each batch's sequences are appended to
   --data_dir/sequences.jsonl as soon as they exist, so an interrupted run resumes where it stopped. With
   --synth_prompts N the model also writes N prompts of its own (synth_prompts), and with --synth_followups M a
   user's second turn after M of those conversations (synth_followups), answered in that context.
2. Training (train): for each sequence the frozen full model runs once, without gradient, and leaves the KV of every
   position in its cache and its distribution q at every position (target_pass). Then the draft blocks
   [x_p, M1 .. M(g-1)], one per anchor p, run through the kept layers with the adapters on, in ONE forward
   (draft_pass): block_mask lets each block see the cached prefix before p and itself causally, which is exactly
   what draft_s3d sees when decoding. The loss at offset k of the block at p is KL(q_{p+k} || draft), weighted per
   offset. Only the heads train; the target's weights never change.

--draft_vocab K gives the heads a draft vocabulary: the K most frequent tokens of the training answers, the only
ones the draft may propose (heads.DraftHeads). --init starts from a heads file instead of fresh heads; with
--steps 0 it only measures them and writes them out (with --draft_vocab: the same heads, with a draft vocabulary;
heads with a sequential head keep their draft vocabulary and its trained rows, and K widens it with the most
frequent tokens it lacks, whose rows start at zero).
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from tqdm import tqdm

import cli
import s3d
from checkpoint import UsageError, check_output, load_without_code, written_then_renamed
from cli import DEFAULT_CHECKPOINT
from heads import (DraftHeads, check_skip, load_heads, middle_third, most_frequent_tokens, new_heads,
                   widened_draft_vocab)
from model import Transformer
from spec_bench import SPEC_BENCH, read_spec_bench
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent
TRAIN_PROMPTS = ROOT / "data" / "train_prompts.jsonl"
HELDOUT_EVERY = 20  # every 20th prompt is held out: its greedy answer measures acceptance, and it is never trained on

# ---------------------------------------------------------------------------------------------------------------
# 1. Self-distilled data


def read_prompts(path: Path) -> list[dict]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read prompts from {path}: {e}") from None
    if not rows or not all(isinstance(r, dict) and "id" in r and "prompt" in r for r in rows):
        raise UsageError(f"{path} must hold JSON lines with 'id' and 'prompt'")
    return rows


def read_sequences(path: Path) -> list[dict]:
    """The rows of a JSON-lines cache. One that a killed run of an older version left with a last line cut short is
    cut back to its last whole line here (that row is then made again)."""
    if not path.is_file():
        return []
    text = path.read_text()
    if not text.endswith("\n") and text:
        text = text[: text.rfind("\n") + 1]
        with written_then_renamed(path) as tmp:
            tmp.write_text(text)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UsageError(f"{path}, line {number}: not JSON; delete the file to make its data again") from None
    return rows


def append_lines(path: Path, lines: list[str]) -> None:
    """Adds lines to a JSON-lines cache: the whole file is written anew under a temporary name and renamed over the
    old one, so that a run killed mid-write leaves the file as it was (a batch of rows to make again, nothing torn)."""
    if lines:
        old = path.read_text() if path.is_file() else ""
        with written_then_renamed(path) as tmp:
            tmp.write_text(old + "".join(lines))


def generate_data(model: Transformer, tokenizer: Tokenizer, prompts: list[dict], data_dir: Path, samples: int,
                  max_new_tokens: int, temperature: float, prompts_per_batch: int, compile: bool) -> list[dict]:
    """Makes (or completes) the self-distilled sequences in data_dir/sequences.jsonl and returns all of them: per
    prompt one greedy answer (sample 0) and samples - 1 sampled ones, prompts_per_batch * samples rows per batch. A
    prompt with a "history" (earlier messages: a follow-up turn) is answered after them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.config.name, "fingerprint": model.config.fingerprint,
            "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), "samples": samples,
            "max_new_tokens": max_new_tokens, "temperature": temperature}
    meta_path, seq_path = data_dir / "meta.json", data_dir / "sequences.jsonl"
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        raise UsageError(f"{data_dir} holds data made with other settings ({meta_path.read_text().strip()}); "
                         "choose another --data_dir")
    with written_then_renamed(meta_path) as tmp:
        tmp.write_text(json.dumps(meta) + "\n")
    done = {(s["id"], s["sample"]) for s in read_sequences(seq_path)}
    todo = [(r["id"], k, cli.encode_prompt(tokenizer, [*r.get("history", []), {"role": "user", "content": r["prompt"]}],
                                            chat=True))
            for r in prompts for k in range(samples) if (r["id"], k) not in done]
    todo.sort(key=lambda t: (t[1] > 0, len(t[2])))  # greedy rows and sampled rows apart, similar lengths together
    rows = prompts_per_batch * samples
    batches = [b for group in ([t for t in todo if t[1] == 0], [t for t in todo if t[1] > 0])
               for b in (group[i:i + rows] for i in range(0, len(group), rows))]
    if todo:
        model.setup_caches(rows, -(-(max(len(t[2]) for t in todo) + max_new_tokens) // 64) * 64)
    bar = tqdm(total=len(todo), desc="self-distillation", unit="answer", disable=not todo)
    made, t0 = 0, time.perf_counter()
    for batch in batches:
        # keep the batch shape static (no recompile): fill a short batch with copies, dropped below
        padded = [p for _, _, p in batch] + [batch[-1][2]] * (rows - len(batch))
        sampling = s3d.Sampling(temperature if batch[0][1] > 0 else 0.0)
        answers = s3d.generate_batch(model, padded, max_new_tokens, sampling, tokenizer.eos_ids, compile)
        append_lines(seq_path, [json.dumps({"id": pid, "sample": k, "prompt_len": len(prompt), "tokens": prompt + answer})
                                + "\n" for (pid, k, prompt), answer in zip(batch, answers)])
        made += sum(map(len, answers[:len(batch)]))
        bar.update(len(batch))
        bar.set_postfix(tokens=made, tok_s=f"{made / (time.perf_counter() - t0):.0f}")
    bar.close()
    if todo:
        print(f"self-distillation: {made} answer tokens, {len(todo)} answers in {(time.perf_counter() - t0) / 60:.1f} min")
    return read_sequences(seq_path)


USER_TURN_TOKENS = 256  # the longest user message sampled


def user_turn_cache(model: Transformer, rows: int, width: int) -> int:
    """Sets up a cache of `rows` rows for prefixes of up to `width` tokens and a user turn after them; returns the
    number of new tokens the turn may have."""
    length = min(model.config.block_size, -(-(width + USER_TURN_TOKENS) // 64) * 64)
    model.setup_caches(rows, length)
    return length - width


def user_turns(model: Transformer, tokenizer: Tokenizer, prefixes: list[list[int]], max_new_tokens: int,
               compile: bool, seen: set[str]) -> list[Optional[str]]:
    """What a user says next after each prefix (a conversation ending in the opening of a user turn), sampled from
    the model, or None where the sample is not a whole new message: cut off before EOS, under 3 words, over 1500
    characters, or already in `seen` (normalized), to which the kept ones are added."""
    texts = []
    for answer in s3d.generate_batch(model, prefixes, max_new_tokens, s3d.Sampling(1.0, None, 0.95),
                                     tokenizer.eos_ids, compile):
        text = tokenizer.decode(answer[:-1], skip_special=True).strip()
        key = normalized(text)
        whole = answer[-1] in tokenizer.eos_ids and len(text.split()) >= 3 and len(text) <= 1500 and key not in seen
        if whole:
            seen.add(key)
        texts.append(text if whole else None)
    return texts


def user_turn_opening(tokenizer: Tokenizer, history: list[dict]) -> list[int]:
    """The tokens of the conversation so far followed by the chat template's opening of a user turn."""
    text = tokenizer.apply_chat_template([*history, {"role": "user", "content": "\x00"}], add_generation_prompt=False)
    return tokenizer.encode(text.split("\x00")[0], bos=False)


def synth_prompts(model: Transformer, tokenizer: Tokenizer, n: int, data_dir: Path, rows_per_batch: int,
                  compile: bool, banned: set[str]) -> list[dict]:
    """n training prompts written by the instruct model itself (the Magpie method): given only its chat template's
    opening of a user turn, it samples what a user would ask (user_turns: whole messages, none twice, none among
    `banned`, the evaluation prompts). Added to data_dir/synth_prompts.jsonl batch by batch, so a run asks only for
    what is missing."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "synth_prompts.jsonl"
    rows = read_sequences(path)[:n]
    prefix = user_turn_opening(tokenizer, [])
    seen = banned | {normalized(r["prompt"]) for r in rows}
    max_new_tokens = user_turn_cache(model, rows_per_batch, len(prefix))
    bar = tqdm(total=n, initial=len(rows), desc="synthetic prompts", unit="prompt", disable=len(rows) >= n)
    for _ in range(50 * n // rows_per_batch + 1):  # a generous bound, in case most samples are dropped
        if len(rows) >= n:
            break
        kept = len(rows)
        for text in user_turns(model, tokenizer, [prefix] * rows_per_batch, max_new_tokens, compile, seen):
            if text is not None and len(rows) < n:
                rows.append({"id": f"synth_{len(rows)}", "prompt": text})
        append_lines(path, [json.dumps(row) + "\n" for row in rows[kept:]])
        bar.update(len(rows) - kept)
    bar.close()
    return rows


def synth_followups(model: Transformer, tokenizer: Tokenizer, synth: list[dict], sequences: list[dict], n: int,
                    data_dir: Path, rows_per_batch: int, compile: bool, banned: set[str]) -> list[dict]:
    """Second user turns, so that some training conversations are multi-turn (Magpie's multi-turn method): shown a
    synthetic prompt, its greedy answer and the opening of the next user turn, the model writes the user's
    follow-up (kept by user_turns' rules). One try per conversation, in order, until n are kept. Rows {"id",
    "history": [user, assistant], "prompt"} in data_dir/synth_followups.jsonl, added batch by batch."""
    path = data_dir / "synth_followups.jsonl"
    rows = read_sequences(path)[:n]
    greedy = {s["id"]: s for s in sequences if s["sample"] == 0}
    done = {r["id"] for r in rows}
    todo = []
    for r in synth:
        if f"{r['id']}_followup" not in done:
            answer = greedy[r["id"]]["tokens"][greedy[r["id"]]["prompt_len"]:]
            history = [{"role": "user", "content": r["prompt"]},  # the answer as bench.py's next turn sees it
                       {"role": "assistant", "content": tokenizer.decode(answer, skip_special=True)}]
            todo.append((r["id"], history, user_turn_opening(tokenizer, history)))
    seen = banned | {normalized(r["prompt"]) for r in rows}
    if len(rows) < n and todo:
        max_new_tokens = user_turn_cache(model, rows_per_batch, max(len(t[2]) for t in todo))
    bar = tqdm(total=n, initial=len(rows), desc="follow-up turns", unit="prompt", disable=len(rows) >= n)
    for i in range(0, len(todo), rows_per_batch):
        if len(rows) >= n:
            break
        batch, kept = todo[i:i + rows_per_batch], len(rows)
        prefixes = [p for _, _, p in batch] + [batch[-1][2]] * (rows_per_batch - len(batch))  # a static batch shape
        for (pid, history, _), text in zip(batch, user_turns(model, tokenizer, prefixes, max_new_tokens, compile, seen)):
            if text is not None and len(rows) < n:
                rows.append({"id": f"{pid}_followup", "history": history, "prompt": text})
        append_lines(path, [json.dumps(row) + "\n" for row in rows[kept:]])
        bar.update(len(rows) - kept)
    bar.close()
    if len(rows) < n:
        print(f"follow-up turns: {len(rows)} kept, fewer than the {n} asked (one try per synthetic conversation)")
    return rows


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def evaluation_prompts() -> set[str]:
    """Every turn of data/spec_bench_dev.jsonl, normalized: never trained on."""
    return {normalized(t) for row in read_spec_bench(SPEC_BENCH) for t in row["turns"]}


def split_heldout(sequences: list[dict], prompts: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training sequences, and the greedy answers of every HELDOUT_EVERY-th prompt (never trained on)."""
    heldout_ids = {r["id"] for i, r in enumerate(prompts) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
    train = [s for s in sequences if s["id"] not in heldout_ids]
    heldout = [s for s in sequences if s["id"] in heldout_ids and s["sample"] == 0]
    return train, heldout


# ---------------------------------------------------------------------------------------------------------------
# 2. Training that mirrors inference


class PrefixKV(torch.nn.Module):
    """Stands in for a layer's KVCache: during target_pass it keeps the packed sequences' keys and values (nothing
    is written to a static cache); during draft_pass it returns those, followed by the draft blocks' own, which
    block_mask sorts out."""
    attention_dtype = None  # attention in the keys' dtype

    def __init__(self, k: Optional[Tensor] = None, v: Optional[Tensor] = None):
        super().__init__()
        self.k, self.v = k, v

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            self.k, self.v = k, v
            return k, v
        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)


class Packed(NamedTuple):
    """Sequences packed into one row: tokens (L,), each token's position in its own sequence (L,), and each
    token's sequence's first and last index in the row (L,)."""
    tokens: Tensor
    positions: Tensor
    first: Tensor
    last: Tensor


def pack(seqs: list[dict], device: torch.device) -> Packed:
    lengths = torch.tensor([len(s["tokens"]) for s in seqs])
    ends = lengths.cumsum(0)
    first, last = (ends - lengths).repeat_interleave(lengths), (ends - 1).repeat_interleave(lengths)
    tokens = torch.tensor([t for s in seqs for t in s["tokens"]])
    return Packed(*(t.to(device) for t in (tokens, torch.arange(len(tokens)) - first, first, last)))


def block_mask(packed_len: int, anchors: Tensor, gamma: int, first: Optional[Tensor] = None,
               bidirectional: bool = False) -> Tensor:
    """(1, 1, n*g, packed_len + n*g): offset k of the block at anchor p sees its own sequence before p (from the
    sequence's first index, `first` of each anchor; 0 for a single sequence) and offsets 0..k of its own block
    (bidirectional: all of its block). That is what the draft at p sees when decoding: the cache up to p - 1, then
    [cur, M1 .. M(g-1)]."""
    n = anchors.shape[0]
    first = torch.zeros_like(anchors) if first is None else first
    block = torch.arange(n, device=anchors.device).repeat_interleave(gamma)
    offset = torch.arange(gamma, device=anchors.device).repeat(n)
    column = torch.arange(packed_len, device=anchors.device)[None, :]
    sees_prefix = (column < anchors[block][:, None]) & (column >= first[block][:, None])
    sees_block = (block[:, None] == block[None, :]) & ((offset[:, None] >= offset[None, :]) | bidirectional)
    return torch.cat([sees_prefix, sees_block], dim=1)[None, None]


def with_kv(model: Transformer, kv: list[PrefixKV], forward: Callable[[], Tensor]) -> Tensor:
    caches = [layer.attention.kv_cache for layer in model.layers]
    try:
        for layer, cache in zip(model.layers, kv):
            layer.attention.kv_cache = cache
        return forward()
    finally:
        for layer, cache in zip(model.layers, caches):
            layer.attention.kv_cache = cache


@torch.no_grad()
def target_pass(model: Transformer, packed: Packed) -> tuple[Tensor, list[PrefixKV]]:
    """The frozen full model on the packed sequences, each attending only to itself: log-probabilities
    (L, vocab) and every layer's KV."""
    kv = [PrefixKV() for _ in model.layers]
    row = torch.arange(len(packed.tokens), device=packed.tokens.device)
    mask = (row[None, :] <= row[:, None]) & (row[None, :] >= packed.first[:, None])
    logits = with_kv(model, kv, lambda: model(packed.tokens[None], packed.positions, mask=mask[None, None]))[0]
    return logits.float().log_softmax(-1), kv


def draft_pass(model: Transformer, packed: Packed, anchors: Tensor, gamma: int, kv: list[PrefixKV]) -> Tensor:
    """Draft logits (n, g, vocab) of the blocks [x_p, M1 .. M(g-1)] for every anchor p (an index into the packed
    row), in one forward. A sequential head's bias comes from the sequence's own tokens x_p .. x_(p+g-1) (teacher
    forcing): when decoding, draft k counts only if the drafts before it were the target's tokens, so these are
    the tokens it follows whenever it matters."""
    heads = model.heads
    positions = (packed.positions[anchors][:, None] + torch.arange(gamma, device=anchors.device)).view(-1)
    mask = block_mask(len(packed.tokens), anchors, gamma, packed.first[anchors], heads.bidirectional)
    logits = with_kv(model, [PrefixKV(c.k, c.v) for c in kv],
                     lambda: model(packed.tokens[anchors][None], positions, draft=True, mask=mask))
    logits = logits.view(anchors.shape[0], gamma, -1)
    if heads.sequential_rank:
        at = torch.minimum(anchors[:, None] + torch.arange(gamma, device=anchors.device), packed.last[anchors][:, None])
        logits = logits + heads.markov_bias(packed.tokens[at])
    return logits


def anchors_of(seqs: list[dict]) -> list[Tensor]:
    """Each sequence's anchors, as indices into the packed row: a draft starts at every answer token that has at
    least one token after it (the first draft of a real decode starts at the first answer token)."""
    anchors, start = [], 0
    for s in seqs:
        anchors.append(torch.arange(start + s["prompt_len"], start + len(s["tokens"]) - 1))
        start += len(s["tokens"])
    return anchors


def distill_loss(draft_logits: Tensor, target_logprobs: Tensor, anchors: Tensor, last: Tensor,
                 offset_weights: Tensor, draft_vocab: Optional[Tensor] = None, tokens: Optional[Tensor] = None,
                 ce_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted KL(q || draft) over offsets. Offset k of the block at p predicts the token after p + k, whose
    target distribution is q at p + k; blocks running past their sequence's end (`last`, per anchor) count only up
    to it. With a draft vocabulary (the draft's logits are over those tokens only) q is restricted to it and
    renormalised. ce_weight adds that much cross-entropy on the sequence's own next tokens (the packed `tokens`;
    PARD's 0.1 CE + 1.0 KL; with a draft vocabulary, on the tokens inside it). Returns the loss, the mean KL per
    offset (g,), and whether each draft equals the target's argmax (n, g)."""
    gamma = draft_logits.shape[1]
    at = anchors[:, None] + torch.arange(gamma, device=anchors.device)  # (n, g): the position whose q is the target
    valid = at <= last[:, None] - 1  # the predicted token exists in the sequence
    q = target_logprobs[torch.minimum(at, last[:, None])]  # (n, g, vocab)
    target = q.argmax(-1)
    drafted = draft_logits.argmax(-1)
    if draft_vocab is not None:
        q, drafted = q[..., draft_vocab].log_softmax(-1), draft_vocab[drafted]
    logp = draft_logits.float().log_softmax(-1)
    kl = (q.exp() * (q - logp)).sum(-1) * valid  # (n, g)
    per_offset = kl.sum(0) / valid.sum(0).clamp_min(1)
    loss_per_offset = per_offset
    if ce_weight > 0:
        labels = tokens[torch.minimum(at + 1, last[:, None])]  # the token the draft at offset k stands for
        if draft_vocab is not None:  # as an index into the draft vocabulary, -1 outside it
            index = torch.full((target_logprobs.shape[-1],), -1, device=labels.device)
            labels = index.index_copy(0, draft_vocab, torch.arange(len(draft_vocab), device=labels.device))[labels]
        counted = valid & (labels >= 0)
        ce = -logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * counted
        loss_per_offset = per_offset + ce_weight * ce.sum(0) / counted.sum(0).clamp_min(1)
    loss = (loss_per_offset * offset_weights).sum() / offset_weights.sum()
    match = (drafted == target) & valid
    return loss, per_offset.detach(), match


def acceptance_from_matches(matches: list[Tensor]) -> tuple[list[float], float]:
    """Per-offset acceptance a_k (given offsets before k accepted) and the tau it implies, from greedy sequences:
    for a greedy answer, the target's argmax at p + k is the sequence's next token, so the draft at offset k would
    be accepted exactly when it and all before it equal the target's argmax."""
    runs = torch.cat([m.int().cumprod(1).sum(1) for m in matches]).cpu()  # accepted drafts per anchor
    gamma = matches[0].shape[1]
    rates = s3d.acceptance_rates(runs.tolist(), gamma)
    return rates, s3d.expected_tokens_per_iteration(rates)


def autocast(model: Transformer):
    """bf16 autocast where the target runs in bf16: the heads keep float32 weights, their matmuls run in bf16."""
    device = model.output.weight.device
    return torch.autocast(device.type, torch.bfloat16, enabled=model.tok_embeddings.weight.dtype == torch.bfloat16)


@torch.no_grad()
def evaluate(model: Transformer, sequences: list[dict], gamma: int, max_anchors: int,
             batch_tokens: int = 4096) -> tuple[list[float], float]:
    """Held-out acceptance per offset and tau, on greedy answers the heads never trained on: the first max_anchors
    anchors of each, whose blocks end inside it (all g drafts judged)."""
    matches = []
    for group in batches_of(sequences, batch_tokens):
        packed = pack(group, model.output.weight.device)
        anchors = torch.cat([a[:max_anchors] for a in anchors_of(group)]).to(packed.tokens.device)
        anchors = anchors[anchors + gamma <= packed.last[anchors]]
        if len(anchors) == 0:
            continue
        with autocast(model):
            q, kv = target_pass(model, packed)
            logits = draft_pass(model, packed, anchors, gamma, kv)
        matches.append(distill_loss(logits, q, anchors, packed.last[anchors], torch.ones(gamma, device=q.device),
                                    model.heads.draft_vocab)[2])
    return acceptance_from_matches(matches) if matches else ([0.0] * gamma, 1.0)


def batches_of(sequences: list[dict], batch_tokens: int) -> list[list[dict]]:
    """Consecutive groups of sequences of at most batch_tokens tokens together (a longer one alone)."""
    groups, group, size = [], [], 0
    for s in sequences:
        if group and size + len(s["tokens"]) > batch_tokens:
            groups.append(group)
            group, size = [], 0
        group.append(s)
        size += len(s["tokens"])
    return groups + [group] if group else groups


@torch.no_grad()
def angular_distances(model: Transformer, sequences: list[dict], n: int) -> list[float]:
    """For each l, the angular distance arccos(cos(h_l, h_(l+n))) / pi between the hidden states entering layer l
    and layer l + n (or the final norm), averaged over the answer tokens of the sequences: how little n layers from
    l change the residual stream, so how little skipping them costs (Gromov et al., 2024)."""
    inputs: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: inputs.append(args[0].float()))
             for m in [*model.layers, model.norm]]
    total = torch.zeros(model.config.n_layer - n + 1)
    count = 0
    model.setup_caches(1, max(len(s["tokens"]) for s in sequences))
    try:
        for seq in sequences:
            inputs.clear()
            model(torch.tensor([seq["tokens"]], device=model.output.weight.device), torch.arange(
                len(seq["tokens"]), device=model.output.weight.device))
            h = torch.stack(inputs)[:, 0, seq["prompt_len"]:]  # (L + 1, answer tokens, dim)
            cos = torch.nn.functional.cosine_similarity(h[:-n], h[n:], dim=-1).clamp(-1, 1)
            total += (torch.arccos(cos) / math.pi).sum(-1).cpu()
            count += h.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    return (total / max(count, 1)).tolist()


def measured_skip(model: Transformer, sequences: list[dict], n: int) -> tuple[int, int]:
    """The n consecutive layers whose skipping changes the hidden state least (angular_distances); prints all."""
    distances = angular_distances(model, sequences, n)
    start = min(range(len(distances)), key=distances.__getitem__)
    print(f"angular distance across {n} layers from layer l, l = 0..{len(distances) - 1}: "
          f"{' '.join(f'{d:.3f}' for d in distances)}; skipping {start}:{start + n}")
    return start, start + n


def learning_rate(step: int, steps: int, lr: float, schedule: str = "cosine") -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to a tenth (or constant)."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def reach_weights(acceptance: list[float]) -> list[float]:
    """Offset weights from the probability that each offset is reached (all drafts before it accepted): 1, a1,
    a1 a2, ...; a draft that is rarely reached rarely pays, whatever its loss. Floored at 0.05 so that no offset is
    dropped for good."""
    weights, reached = [], 1.0
    for a in [1.0, *acceptance[:-1]]:
        reached *= a
        weights.append(max(reached, 0.05))
    return weights


def logged_step(line: str) -> float:
    """The step of one line of the training log; infinity for a line cut off by a killed run."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def train(model: Transformer, heads: DraftHeads, train_seqs: list[dict], heldout: list[dict], args,
          acceptance: Optional[list[float]] = None) -> dict:
    """Trains heads (attached to model) on the sequences; returns what it cost. Saves heads + state every eval.
    acceptance: the heads' held-out acceptance when the caller has measured it already (--offset_weights reached
    starts from it)."""
    model.set_heads(heads)
    heads.float()  # float32 weights to train, whatever the target's dtype (autocast runs their matmuls in bf16)
    model.requires_grad_(False)  # the target stays frozen: only the heads' parameters get gradients
    heads.requires_grad_(True)
    device = model.output.weight.device
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
    state_path = args.out.with_suffix(".train.pt")
    log_path = args.out.with_suffix(".log.jsonl")
    step, cursor, seen_tokens, seen_drafts, elapsed = 0, 0, 0, 0, 0.0
    logged: list[str] = []  # the log's lines, written out with every save, so that log and state always agree
    rng = random.Random(args.seed)
    order = list(range(len(train_seqs)))
    rng.shuffle(order)
    if args.resume:
        state = load_without_code(state_path)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step, cursor, order = state["step"], state["cursor"], state["order"]
        seen_tokens, seen_drafts, elapsed = state["seen_tokens"], state["seen_drafts"], state["elapsed"]
        # the log as it was saved with the state (a log from an older version may run on past it, or end torn)
        logged = [line.rstrip("\n") + "\n" for line in log_path.read_text().splitlines(keepends=True)
                  if logged_step(line) <= step] if log_path.is_file() else []
    if args.offset_weights == "reached":  # from the heads' held-out acceptance, renewed at every evaluation
        if acceptance is None:
            acceptance = evaluate(model, heldout, args.gamma, args.eval_anchors)[0]
        weights = torch.tensor(reach_weights(acceptance), device=device)
    else:
        weights = torch.tensor(args.offset_weights, device=device)
    longest = max(len(s["tokens"]) for s in train_seqs + heldout)
    model.setup_caches(1, longest + args.gamma)
    bar = tqdm(total=args.steps, initial=step, desc="training", unit="step")
    t0 = time.perf_counter() - elapsed
    while step < args.steps:
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate(step, args.steps, args.lr, args.lr_schedule)
        optimizer.zero_grad(set_to_none=True)
        group, drafts = [], 0
        while drafts < args.batch_tokens:  # whole sequences, packed into one forward
            seq = train_seqs[order[cursor % len(order)]]
            cursor += 1
            if len(seq["tokens"]) - 1 > seq["prompt_len"]:
                group.append(seq)
                drafts += (len(seq["tokens"]) - 1 - seq["prompt_len"]) * args.gamma
        packed = pack(group, device)
        anchors = torch.cat(anchors_of(group))
        if len(anchors) > args.batch_tokens // args.gamma:  # a random subset keeps one forward's size fixed
            anchors = anchors[torch.randperm(len(anchors), generator=torch.Generator().manual_seed(cursor))
                              [: args.batch_tokens // args.gamma]].sort().values
        anchors = anchors.to(device)
        with autocast(model):
            q, kv = target_pass(model, packed)
            loss, per_offset, _ = distill_loss(draft_pass(model, packed, anchors, args.gamma, kv), q, anchors,
                                               packed.last[anchors], weights, heads.draft_vocab, packed.tokens,
                                               args.ce_weight)
        loss.backward()
        drafts = len(anchors) * args.gamma
        seen_tokens += len(packed.tokens)
        optimizer.step()
        step += 1
        seen_drafts += drafts
        bar.update(1)
        loss, per_offset = loss.item(), per_offset.tolist()
        bar.set_postfix(loss=f"{loss:.3f}", kl=" ".join(f"{k:.2f}" for k in per_offset),
                        drafts_s=f"{seen_drafts / (time.perf_counter() - t0):.0f}")
        record = {"step": step, "loss": loss, "kl_per_offset": per_offset, "lr": optimizer.param_groups[0]["lr"]}
        if step % args.eval_every == 0 or step == args.steps:
            rates, tau = evaluate(model, heldout, args.gamma, args.eval_anchors)
            record |= {"heldout_acceptance": rates, "heldout_tau": tau}
            if args.offset_weights == "reached":
                weights = torch.tensor(reach_weights(rates), device=device)
                record["offset_weights"] = weights.tolist()
            tqdm.write(f"step {step}: loss {record['loss']:.3f}, held-out acceptance per offset "
                       f"{' '.join(f'{a:.2f}' for a in rates)}, tau {tau:.2f}")
            elapsed = time.perf_counter() - t0
            heads.meta |= {"trained_steps": step, "trained_tokens": seen_tokens, "heldout_tau": round(tau, 3)}
            heads.save(args.out)
            with written_then_renamed(log_path) as tmp:
                tmp.write_text("".join(logged) + json.dumps(record) + "\n")
            with written_then_renamed(state_path) as tmp:
                torch.save({"heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "cursor": cursor, "order": order, "seen_tokens": seen_tokens, "seen_drafts": seen_drafts,
                            "elapsed": elapsed}, tmp)
        logged.append(json.dumps(record) + "\n")
    bar.close()
    return {"steps": step, "sequence_tokens": seen_tokens, "draft_tokens": seen_drafts,
            "wall_s": time.perf_counter() - t0, "peak_memory_gib": cli.peak_memory_bytes(device) / 2**30}


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="Train S3D heads by self-distillation from the frozen target.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="converted checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="heads file to write (safetensors)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", *cli.DTYPES],
                   help="the target's dtype (auto: bfloat16 on a GPU or a CPU with native bf16, else float32); the "
                        "heads train in float32 with bf16 autocast")
    p.add_argument("--skip", metavar="S:E", type=skip_or_auto, default=None,
                   help="layers S..E-1 to skip in the draft (default: the middle third), or auto:N, the N layers "
                        "that change the held-out answers' hidden states least (angular distance)")
    p.add_argument("--gamma", type=int, default=4, help="tokens drafted at once (g)")
    p.add_argument("--rank", type=int, default=None,
                   help="adapter rank (default 8; 0: mask embeddings only); with --init, at least the file's: a "
                        "higher one adds directions that start at zero")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (0, with --init: measure and write only)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch_tokens", type=int, default=2048, help="draft positions per optimizer step")
    p.add_argument("--draft_vocab", type=int, default=None, metavar="K", help="draft only the K most frequent tokens "
                   "of the training answers: the draft's output head reads K rows (verify keeps them all); --init "
                   "heads with a sequential head keep their draft vocabulary and widen it to K")
    p.add_argument("--init", type=Path, metavar="HEADS", help="start from this heads file (its skip, g and rank; --rank may widen it)")
    p.add_argument("--offset_weights", default=None, help="loss weight per draft offset, e.g. 1,1,1,1 (default), or "
                   "'reached': the probability that the offset is reached (1, a1, a1 a2, ..., from the held-out "
                   "acceptance, renewed at every evaluation)")
    p.add_argument("--ce_weight", type=float, default=0.0,
                   help="add this much cross-entropy on the answers' own next tokens to the KL (PARD uses 0.1)")
    p.add_argument("--sequential_rank", type=int, default=0, metavar="R", help="a sequential head of rank R: each "
                   "draft's logits get a bias from the token drafted before it (0: none; with --init, added to the file's heads)")
    p.add_argument("--bidirectional", action="store_true",
                   help="the draft block [cur, M1 ..] attends to all of itself instead of causally")
    p.add_argument("--lr_schedule", choices=["cosine", "constant"], default="cosine",
                   help="after a 5 %% warm-up: cosine decay to a tenth of --lr, or constant")
    p.add_argument("--resume", action="store_true", help="continue the run saved next to --out")
    p.add_argument("--force", action="store_true", help="replace --out (and its log and training state) if they exist")
    p.add_argument("--eval_every", type=int, default=50, help="steps between held-out evaluations (and saves)")
    p.add_argument("--eval_anchors", type=int, default=128, help="anchors per held-out sequence")
    p.add_argument("--prompts", type=Path, default=TRAIN_PROMPTS, help="training prompts (JSON lines: id, prompt)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--synth_prompts", type=int, default=0, metavar="N",
                   help="also train on N prompts the model writes itself (Magpie), kept in --data_dir")
    p.add_argument("--synth_followups", type=int, default=0, metavar="N",
                   help="and on N two-turn conversations: the model writes a user's follow-up to N of its synthetic "
                        "prompts and its own answer, then answers that too")
    p.add_argument("--train_sequences", type=int, default=None, metavar="N",
                   help="train on N of the training sequences, drawn at random (data-size experiments; the held-out "
                        "answers stay the same)")
    p.add_argument("--data_dir", type=Path, default=None, help="where the self-distilled sequences are cached "
                   "(default: runs/distill-<checkpoint name>)")
    p.add_argument("--samples", type=int, default=2, help="answers per prompt: one greedy, the rest sampled")
    p.add_argument("--data_temperature", type=float, default=0.8, help="temperature of the sampled answers")
    p.add_argument("--data_max_new_tokens", type=int, default=128)
    p.add_argument("--prompts_per_batch", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="compile the data generation's decode step")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def skip_or_auto(text: str) -> tuple[int, int] | int:
    """--skip: 'S:E' -> (S, E), or 'auto:N' -> N (the range is measured once the data exist)."""
    if text.startswith("auto:"):
        try:
            return int(text.removeprefix("auto:"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto:N (a number of layers), got {text!r}") from None
    return cli.skip_range(text)


def offset_weights(args: argparse.Namespace) -> None:
    """--offset_weights as g floats (default all 1), or 'reached'."""
    if args.offset_weights == "reached":
        return
    try:
        weights = [float(w) for w in args.offset_weights.split(",")] if args.offset_weights else [1.0] * args.gamma
    except ValueError:
        raise UsageError(f"--offset_weights needs {args.gamma} numbers separated by commas, got {args.offset_weights!r}") from None
    args.offset_weights = weights
    if len(weights) != args.gamma or not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:
        raise UsageError(f"--offset_weights needs {args.gamma} non-negative numbers, not all zero")


@cli.program
def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.rank is None and not args.init:  # (with --init: the file's rank)
        args.rank = 8
    torch.manual_seed(args.seed)
    for name, value, least in (("--gamma", args.gamma, 1), ("--rank", 0 if args.rank is None else args.rank, 0),
                               ("--steps", args.steps, 0 if args.init else 1), ("--draft_vocab", 1 if args.draft_vocab is None else args.draft_vocab, 1),
                               ("--batch_tokens", args.batch_tokens, args.gamma), ("--samples", args.samples, 1),
                               ("--data_max_new_tokens", args.data_max_new_tokens, 2),
                               ("--prompts_per_batch", args.prompts_per_batch, 1), ("--eval_every", args.eval_every, 1),
                               ("--eval_anchors", args.eval_anchors, 1)):
        if value < least:
            raise UsageError(f"{name} must be at least {least}, got {value}")
    if args.synth_prompts < 0:
        raise UsageError(f"--synth_prompts must be at least 0, got {args.synth_prompts}")
    if not 0 <= args.synth_followups <= args.synth_prompts:
        raise UsageError(f"--synth_followups must be between 0 and --synth_prompts ({args.synth_prompts}), got "
                         f"{args.synth_followups}")
    if args.train_sequences is not None and args.train_sequences < 1:
        raise UsageError(f"--train_sequences must be at least 1, got {args.train_sequences}")
    if not 0 <= args.ce_weight < math.inf:
        raise UsageError(f"--ce_weight must be a number >= 0, got {args.ce_weight}")
    if args.sequential_rank < 0:
        raise UsageError(f"--sequential_rank must be at least 0, got {args.sequential_rank}")
    if not 0 < args.lr < math.inf:
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not 0 < args.data_temperature < math.inf:
        raise UsageError(f"--data_temperature must be a positive number, got {args.data_temperature}")
    if args.limit is not None and args.limit < HELDOUT_EVERY:
        raise UsageError(f"--limit must be at least {HELDOUT_EVERY} (every {HELDOUT_EVERY}th prompt is held out), got {args.limit}")
    if not args.init:  # (with --init g comes from the heads file)
        offset_weights(args)
    if args.init and (args.resume or args.skip or args.bidirectional):
        raise UsageError("--init takes the heads' own skip range, g, rank and mask, and cannot be combined with "
                         "--resume, --skip or --bidirectional")
    if args.resume and not args.out.with_suffix(".train.pt").is_file():
        raise UsageError(f"nothing to resume: {args.out.with_suffix('.train.pt')} does not exist")
    if not args.resume:  # every output checked now, not at the first save after minutes of work
        for path in (args.out, args.out.with_suffix(".train.pt"), args.out.with_suffix(".log.jsonl")):
            # (--out may be --init's file: it is read whole before anything is written)
            check_output(path, args.force, (args.checkpoint, args.prompts), "--out")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = cli.resolve_device(args.device)
    model, tokenizer = cli.load(args.checkpoint, device, cli.DTYPES[cli.resolve_dtype(args.dtype, device)])
    if max(args.rank or 0, args.sequential_rank) > model.config.dim or args.gamma > model.config.block_size:
        raise UsageError(f"--rank and --sequential_rank may be at most {model.config.dim} (the model's width) and "
                         f"--gamma at most {model.config.block_size}, got {args.rank}, {args.sequential_rank} and "
                         f"{args.gamma}")
    if args.draft_vocab and args.draft_vocab > model.config.vocab_size:
        raise UsageError(f"--draft_vocab may be at most {model.config.vocab_size} (the model's vocabulary), got "
                         f"{args.draft_vocab}")
    heads = load_heads(args.init, model.config) if args.init else None
    if heads is not None:
        if args.rank is not None and args.rank < heads.rank:
            raise UsageError(f"--rank {args.rank}: {args.init} has adapters of rank {heads.rank}, which --init keeps; "
                             f"give at least {heads.rank}")
        args.gamma, args.rank = heads.gamma, heads.rank if args.rank is None else args.rank
        offset_weights(args)
        if heads.sequential_rank and args.draft_vocab:  # refused before the data are made
            if heads.draft_vocab is None:
                raise UsageError("--draft_vocab cannot be given to heads whose sequential head was trained on the "
                                 "whole vocabulary (its output rows are every token's)")
            widened_draft_vocab(heads.draft_vocab, heads.draft_vocab, args.draft_vocab)  # (too few: UsageError)
        if heads.sequential_rank and args.sequential_rank:
            raise UsageError(f"--sequential_rank: {args.init} has a sequential head already")
    n_layer = model.config.n_layer
    if isinstance(args.skip, int) and not 1 <= args.skip < n_layer:
        raise UsageError(f"--skip auto:N needs 1 <= N < {n_layer} (the model's layers), got {args.skip}")
    if isinstance(args.skip, tuple):
        check_skip(args.skip, n_layer)
    prompts = read_prompts(args.prompts)[: args.limit]
    data_dir = args.data_dir or ROOT / "runs" / f"distill-{args.checkpoint.name}"
    banned = evaluation_prompts()
    synth = synth_prompts(model, tokenizer, args.synth_prompts, data_dir, args.prompts_per_batch * args.samples,
                          args.compile, banned) if args.synth_prompts else []
    sequences = generate_data(model, tokenizer, prompts + synth, data_dir, args.samples, args.data_max_new_tokens,
                              args.data_temperature, args.prompts_per_batch, args.compile)
    if args.synth_followups:
        followups = synth_followups(model, tokenizer, synth, sequences, args.synth_followups, data_dir,
                                    args.prompts_per_batch * args.samples, args.compile, banned)
        sequences = generate_data(model, tokenizer, prompts + synth + followups, data_dir, args.samples,
                                  args.data_max_new_tokens, args.data_temperature, args.prompts_per_batch, args.compile)
    train_seqs, heldout = split_heldout(sequences, prompts)
    if not train_seqs or not heldout:
        raise UsageError(f"need at least {HELDOUT_EVERY} prompts (every {HELDOUT_EVERY}th is held out)")
    if args.train_sequences is not None:
        if args.train_sequences > len(train_seqs):
            raise UsageError(f"--train_sequences: there are only {len(train_seqs)} training sequences")
        train_seqs = random.Random(args.seed).sample(train_seqs, args.train_sequences)
    if heads is not None:
        skip = heads.skip
    elif isinstance(args.skip, int):
        skip = measured_skip(model, heldout, args.skip)
    else:
        skip = args.skip or middle_third(n_layer)
    print(f"data: {len(train_seqs)} training sequences, {sum(len(s['tokens']) - s['prompt_len'] for s in train_seqs)} "
          f"answer tokens; {len(heldout)} held-out greedy answers")
    vocab = None
    if args.draft_vocab:
        answers = torch.tensor([t for s in heldout for t in s["tokens"][s["prompt_len"]:]])
        if heads is not None and heads.draft_vocab is not None:
            print(f"draft vocabulary of {args.init.name}: {len(heads.draft_vocab)} tokens, holding "
                  f"{torch.isin(answers, heads.draft_vocab.cpu()).float().mean():.1%} of the held-out answers' tokens")
        vocab = most_frequent_tokens([s["tokens"][s["prompt_len"]:] for s in train_seqs], model.config.vocab_size,
                                     model.config.vocab_size)
        if heads is not None and heads.sequential_rank:
            vocab = widened_draft_vocab(heads.draft_vocab.cpu(), vocab, args.draft_vocab)
            what = f"its {len(heads.draft_vocab)} tokens and the most frequent others of the training answers"
        else:
            vocab, what = vocab[:args.draft_vocab], "the most frequent tokens of the training answers"
        print(f"draft vocabulary: {len(vocab)} tokens, {what}; they hold "
              f"{torch.isin(answers, vocab).float().mean():.1%} of the held-out answers' tokens")
    if heads is None:
        heads = new_heads(model, skip, args.gamma, args.rank, vocab, args.sequential_rank, args.bidirectional)
    elif vocab is not None or args.sequential_rank or args.rank > heads.rank:
        # the same heads with a new draft vocabulary, a sequential head or more adapter directions
        vocab = heads.draft_vocab if vocab is None else vocab
        state = {**heads.state_dict(), "draft_vocab": vocab}
        old_rank = heads.rank
        heads = DraftHeads(model.config, heads.skip, heads.gamma, args.rank, heads.meta, vocab,
                           args.sequential_rank or heads.sequential_rank, heads.bidirectional)
        fresh = heads.state_dict()
        for name, trained in state.items():
            if trained is not None and trained.shape != fresh[name].shape:
                # grown (an adapter's new directions, a sequential head's rows for a widened draft vocabulary): the
                # trained part kept, the rest as new heads start it (A random, B and sequential_out zero), so the
                # draft is unchanged until trained
                grown = fresh[name].clone()
                grown[tuple(slice(0, n) for n in trained.shape)] = trained
                state[name] = grown
        missing, _ = heads.load_state_dict(state, strict=False)
        # a new sequential head, and adapters where the file had none, start untrained
        assert all(n in ("sequential_in", "sequential_out") or (old_rank == 0 and n.startswith("adapters."))
                   for n in missing), missing
    command = " ".join(["python", "train_heads.py", *(argv if argv is not None else sys.argv[1:])])
    # the recipe of heads that started from a file: the command that made it, then this one
    heads.meta["train_command"] = heads.meta.get("train_command", "?") + " && " + command if args.init else command
    rates = None
    if not args.resume:  # the baseline that training is measured against (a resumed run printed it already)
        model.set_heads(heads)
        model.setup_caches(1, max(len(s["tokens"]) for s in sequences) + args.gamma)
        rates, tau = evaluate(model, heldout, args.gamma, args.eval_anchors)
        print(f"{'starting' if args.init else 'untrained'} heads: held-out acceptance per offset "
              f"{' '.join(f'{a:.2f}' for a in rates)}, tau {tau:.2f}")
        if args.steps == 0:
            heads.meta["heldout_tau"] = round(tau, 3)
            heads.float().save(args.out)
            print(f"wrote {args.out}")
            return
    cost = train(model, heads, train_seqs, heldout, args, rates)
    print(f"wrote {args.out}: {cost['steps']} steps, {cost['sequence_tokens']} sequence tokens and "
          f"{cost['draft_tokens']} draft positions seen, {cost['wall_s'] / 60:.1f} min, peak memory {cost['peak_memory_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
