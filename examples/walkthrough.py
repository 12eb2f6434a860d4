"""One S3D iteration on the embedded default model, step by step: the tensors' shapes and every decision.

    python examples/walkthrough.py
    python examples/walkthrough.py --prompt "Name three prime numbers." --iterations 3

It calls the same functions as generate.py (model.Transformer.forward, s3d.prefill, s3d.accept_greedy), spelled
out one at a time, greedy and in float32, so its decisions are exactly those `generate.py --show_drafts` prints
for the same prompt.
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import s3d  # noqa: E402
from cli import DEFAULT_CHECKPOINT, DEFAULT_PROMPT, encode_prompt, load  # noqa: E402
from checkpoint import UsageError  # noqa: E402
from heads import load_heads  # noqa: E402

DEFAULT_HEADS = ROOT / "heads" / "smollm2-135m-instruct.safetensors"


def show(tokenizer, tokens: list[int]) -> str:
    return " ".join(repr(tokenizer.decode([t])) for t in tokens)


@cli.program
def main(argv=None) -> None:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / DEFAULT_CHECKPOINT)
    p.add_argument("--heads", type=Path, default=DEFAULT_HEADS)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--iterations", type=int, default=1, help="S3D iterations to walk through")
    args = p.parse_args(argv)
    if args.iterations < 1:
        p.error(f"--iterations must be at least 1, got {args.iterations}")
    torch.set_grad_enabled(False)

    model, tokenizer = load(args.checkpoint, torch.device("cpu"), torch.float32)
    heads = load_heads(args.heads, model.config)
    model.set_heads(heads)
    c, g, (s, e) = model.config, heads.gamma, heads.skip
    print(f"target: {c.name}, {c.n_layer} layers, dim {c.dim}, vocabulary {c.vocab_size}")
    print(f"draft: the same weights with layers {s}..{e - 1} skipped ({c.n_layer - (e - s)} of {c.n_layer} kept), "
          f"{g - 1} mask embeddings {tuple(heads.mask_embeddings.shape)} and rank-{heads.rank} adapters on the kept "
          f"layers: {sum(t.numel() for t in heads.parameters()):,} parameters in all")

    prompt = encode_prompt(tokenizer, [{"role": "user", "content": args.prompt}], chat=bool(tokenizer.chat_template))
    if len(prompt) + (g + 1) * args.iterations > c.block_size:
        raise UsageError(f"the prompt ({len(prompt)} tokens) and {args.iterations} iterations of {g + 1} tokens exceed "
                         f"the model's context of {c.block_size}")
    s3d.prepare_cache(model, len(prompt) + (g + 1) * args.iterations)
    print(f"\n1. Prefill: the prompt, {len(prompt)} tokens, through all layers fills the KV cache "
          f"{tuple(model.layers[0].attention.kv_cache.k_cache.shape)} (batch, kv heads, positions, head dim) per layer")
    prompt_t = torch.tensor([prompt])
    cur = s3d.prefill(model, prompt_t, torch.arange(len(prompt)))
    pos = len(prompt)
    print(f"   the target's first token: {show(tokenizer, [cur.item()])}; `cur` = it, at position p = {pos}, "
          f"its KV not yet cached")

    text = [cur.item()]
    for it in range(1, args.iterations + 1):
        print(f"\n--- iteration {it} (p = {pos}) ---")
        draft_pos = torch.arange(pos, pos + g)
        print(f"2. Draft: one forward of [cur, M1 .. M{g - 1}] at positions {draft_pos.tolist()} through the kept layers, "
              f"adapters on (s3d.draft_s3d)")
        drafts = s3d.draft_s3d(model, cur, draft_pos)[0]  # the argmax of each position's logits, as token ids
        vocab = model.heads.draft_vocab
        print(f"   input ids {tuple(cur.shape)} -> embeddings + masks ({g}, {c.dim}) -> logits "
              f"({g}, {c.vocab_size if vocab is None else len(vocab)})"
              f"{'; the block attends to all of itself (bidirectional heads)' if heads.bidirectional else ''}")
        if vocab is not None:  # logit k is token draft_vocab[k]: the draft's output head has K rows
            print(f"   over the heads' draft vocabulary of {len(vocab)} tokens only; verify scores all {c.vocab_size}")
        if heads.sequential_rank:
            print(f"   the sequential head adds to draft i's logits a rank-{heads.sequential_rank} bias from the token "
                  f"before it (cur, d1, ..), one draft after the other")
        print(f"   position i predicts the token after it: drafts d1..d{g} = {show(tokenizer, drafts.tolist())}")

        verify_pos = torch.arange(pos, pos + g + 1)
        print(f"3. Verify: one forward of [cur, d1 .. d{g}] at positions {verify_pos.tolist()} through all "
              f"{c.n_layer} layers, adapters off (s3d.verify_step); it overwrites the draft's cache entries")
        target_logits = model(torch.cat([cur.view(1, 1), drafts.view(1, -1)], dim=1), verify_pos)[0]
        print(f"   logits {tuple(target_logits.shape)}: the target's choice after cur, d1, .., d{g}")

        n, tokens = s3d.accept_greedy(drafts, target_logits)
        n = n.item()
        target = tokens.tolist()
        print("4. Accept (s3d.accept_greedy): keep the drafts that equal the target's choice, up to the first that does not")
        for i in range(g):
            draft = f"   d{i + 1} = {show(tokenizer, [drafts[i].item()]):<14}"
            if i <= n:
                verdict = "accept" if i < n else "reject"
                print(f"{draft} target wants {show(tokenizer, [target[i]]):<14} -> {verdict}")
            else:  # the target's choice here was made after a wrong token, so it means nothing
                print(f"{draft} never checked: it follows a rejected draft")
        kind = "bonus (all drafts accepted)" if n == g else f"replacement of d{n + 1}"
        print(f"   accepted {n} of {g}; the target's own token {show(tokenizer, [target[n]])} follows ({kind})")
        print(f"   this iteration adds {n + 1} tokens: {show(tokenizer, target[: n + 1])}")
        cur = tokens[n].view(1, 1).clone()
        pos += n + 1
        print(f"5. Advance: cur = {show(tokenizer, [cur.item()])}, p = {pos}. Nothing is rolled back: cache entries "
              f"past p are never attended to and get overwritten")
        text += target[: n + 1]
    print(f"\ntext so far: {tokenizer.decode(text)!r}")


if __name__ == "__main__":
    main()
