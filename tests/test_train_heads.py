"""train_heads.py on tiny models: the block-mask training forward equals the real draft step, training lowers the
loss and leaves the target untouched, batched self-distillation equals one-by-one decoding, and the CLI's errors."""
import json
import os
from pathlib import Path

import pytest
import torch

import s3d
import train_heads
from checkpoint import CheckpointError
from heads import load_heads, new_heads
from test_s3d import tiny_model, with_trained_looking_heads


def test_block_mask_gives_the_draft_logits_of_the_real_draft_step():
    """Three sequences packed into one row: every anchor's draft logits are those of the real draft step at that
    position of its own sequence, and the target pass is the full model on each sequence alone."""
    model = with_trained_looking_heads(tiny_model(), skip=(2, 4), gamma=4, rank=4)
    torch.manual_seed(0)
    seqs = [{"prompt_len": 3, "tokens": torch.randint(0, 96, (n,)).tolist()} for n in (40, 12, 25)]
    model.setup_caches(1, 64)
    packed = train_heads.pack(seqs, torch.device("cpu"))
    q, kv = train_heads.target_pass(model, packed)
    anchors = torch.tensor([5, 6, 17, 30, 38, 40 + 3, 40 + 10, 52 + 3, 52 + 20])
    batched = train_heads.draft_pass(model, packed, anchors, 4, kv)
    with torch.no_grad():
        for i, p in enumerate(anchors.tolist()):
            start = packed.first[p].item()
            tokens, at = packed.tokens[start:packed.last[p] + 1], p - start
            model.setup_caches(1, 64)
            s3d.prefill(model, tokens[None, :at], torch.arange(at))  # the cache as a decode at position p has it
            alone = model(tokens[at].view(1, 1), torch.arange(at, at + 4), draft=True)[0]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)
        # and the target pass is the full model itself, on each sequence alone
        start = 0
        for s in seqs:
            model.setup_caches(1, 64)
            full = model(torch.tensor([s["tokens"]]), torch.arange(len(s["tokens"])))[0].log_softmax(-1)
            torch.testing.assert_close(q[start:start + len(s["tokens"])], full, atol=1e-5, rtol=1e-5)
            start += len(s["tokens"])


@pytest.mark.parametrize("sequential_rank,bidirectional,draft_vocab", [(3, False, False), (0, True, False),
                                                                      (3, True, True)])
def test_training_forward_gives_the_draft_step_of_the_sequential_head_and_bidirectional_block(
        sequential_rank, bidirectional, draft_vocab):
    """Sequences made of the drafts the real draft step sampled: the training forward (teacher forcing on those
    tokens) gives exactly the distributions the draft step sampled each of them from."""
    model = with_trained_looking_heads(tiny_model(), sequential_rank=sequential_rank, bidirectional=bidirectional)
    if draft_vocab:
        vocab = torch.randperm(96, generator=torch.Generator().manual_seed(2))[:60]
        heads = new_heads(model, (2, 4), 4, 4, vocab, sequential_rank, bidirectional)
        heads.load_state_dict({k: v[vocab] if k == "sequential_out" else v
                               for k, v in model.heads.state_dict().items()} | {"draft_vocab": vocab})
        model.set_heads(heads)
    with torch.no_grad():
        if sequential_rank:
            model.heads.sequential_in.normal_(0, 1.0)
            model.heads.sequential_out.normal_(0, 1.0)
        torch.manual_seed(0)
        seqs, probs = [], []
        for n in (20, 31):
            prefix = torch.randint(0, 96, (n,)).tolist()
            model.setup_caches(1, 64)
            s3d.prefill(model, torch.tensor([prefix[:-1]]), torch.arange(n - 1))
            drafts, p = s3d.draft_s3d(model, torch.tensor([prefix[-1:]]), torch.arange(n - 1, n + 3),
                                      s3d.Sampling(1.0), s3d.draft_mask(model, n - 1, 4))
            seqs.append({"prompt_len": 3, "tokens": prefix + drafts.tolist()})
            probs.append(p if not draft_vocab else p[:, vocab])
        packed = train_heads.pack(seqs, torch.device("cpu"))
        q, kv = train_heads.target_pass(model, packed)
        logits = train_heads.draft_pass(model, packed, torch.tensor([19, 24 + 30]), 4, kv)
    torch.testing.assert_close(logits.softmax(-1), torch.stack(probs), atol=1e-5, rtol=1e-5)


def test_cross_entropy_term_scores_the_sequences_own_next_tokens():
    """ce_weight adds w * CE on the token each draft stands for; with a draft vocabulary, tokens outside it are not
    scored (the draft cannot propose them)."""
    torch.manual_seed(0)
    seqs = [{"prompt_len": 1, "tokens": [5, 6, 7, 8, 2]}]
    packed = train_heads.pack(seqs, torch.device("cpu"))
    anchors, last = torch.tensor([1]), packed.last[torch.tensor([1])]
    q = torch.randn(5, 16).log_softmax(-1)
    logits = torch.randn(1, 2, 16)
    kl = train_heads.distill_loss(logits, q, anchors, last, torch.ones(2))[0]
    with_ce = train_heads.distill_loss(logits, q, anchors, last, torch.ones(2), None, packed.tokens, 0.5)[0]
    logp = logits.log_softmax(-1)[0]
    ce = -(logp[0, 7] + logp[1, 8]) / 2  # offset 0 of the block at 6 stands for 7, offset 1 for 8
    torch.testing.assert_close(with_ce, kl + 0.5 * ce)
    vocab = torch.tensor([8, 3, 5, 1])  # 7 is outside: only offset 1 (token 8, index 0) is scored
    logits = torch.randn(1, 2, 4)
    kl = train_heads.distill_loss(logits, q, anchors, last, torch.ones(2), vocab)[0]
    with_ce = train_heads.distill_loss(logits, q, anchors, last, torch.ones(2), vocab, packed.tokens, 0.5)[0]
    torch.testing.assert_close(with_ce, kl + 0.5 * -logits.log_softmax(-1)[0, 1, 0] / 2)


def test_reach_weights_and_the_measured_skip_range():
    assert train_heads.reach_weights([0.5, 0.4, 0.2, 0.9]) == [1.0, 0.5, 0.2, 0.05]  # 0.04 floored at 0.05
    model = tiny_model()
    seqs = sequences(3, length=20, prompt_len=4)
    distances = train_heads.angular_distances(model, seqs, 2)
    assert len(distances) == 5 and all(0 <= d <= 1 for d in distances)
    with torch.no_grad():  # make layers 3 and 4 do (almost) nothing: that is the pair to skip
        for i in (3, 4):
            for p in model.layers[i].parameters():
                p.mul_(1e-4) if p.dim() > 1 else None
    assert train_heads.measured_skip(model, seqs, 2) == (3, 5)


def test_distill_loss_stops_at_each_sequence_end():
    seqs = [{"prompt_len": 1, "tokens": [5, 6, 7, 8]}, {"prompt_len": 1, "tokens": [9, 10, 11]}]
    packed = train_heads.pack(seqs, torch.device("cpu"))
    anchors = torch.cat(train_heads.anchors_of(seqs))
    assert anchors.tolist() == [1, 2, 5]  # answer tokens with a token after them, in packed indices
    logits = torch.zeros(3, 3, 16)
    _, _, match = train_heads.distill_loss(logits, torch.zeros(7, 16).log_softmax(-1), anchors, packed.last[anchors],
                                           torch.ones(3))
    judged = (anchors[:, None] + torch.arange(3)) <= packed.last[anchors][:, None] - 1
    assert judged.tolist() == [[True, True, False], [True, False, False], [True, False, False]]
    assert not match[~judged].any()


def test_distill_loss_with_a_draft_vocabulary():
    """The draft scores only its K tokens: its target is q restricted to them and renormalised, and a draft is a
    match when the token it stands for is the target's argmax, which may lie outside the K."""
    torch.manual_seed(0)
    q = torch.randn(6, 16).log_softmax(-1)
    vocab = torch.tensor([3, 5, 7, 11])
    q[:, 5] += 10  # the target's argmax: token 5 at every position ...
    q[4, 12] += 20  # ... except position 4, where it is 12, outside the draft vocabulary
    q = q.log_softmax(-1)
    logits = torch.randn(2, 3, 4)
    logits[..., 1] += 10  # every draft proposes index 1 of the vocabulary: token 5
    anchors, last = torch.tensor([1, 2]), torch.tensor([5, 5])
    loss, per_offset, match = train_heads.distill_loss(logits, q, anchors, last, torch.ones(3), vocab)
    assert match.tolist() == [[True, True, True], [True, True, False]]  # at 2 + 2 = 4 token 12 is the target
    restricted = q[:, vocab].log_softmax(-1)
    at = anchors[:, None] + torch.arange(3)
    kl = (restricted[at].exp() * (restricted[at] - logits.log_softmax(-1))).sum(-1)
    valid = at <= 4
    torch.testing.assert_close(per_offset, (kl * valid).sum(0) / valid.sum(0))


def test_block_mask_shape_and_visibility():
    mask = train_heads.block_mask(6, torch.tensor([2, 4]), 3)[0, 0]
    packed = train_heads.block_mask(6, torch.tensor([2, 4]), 3, first=torch.tensor([0, 3]))[0, 0]
    assert packed[3, :6].tolist() == [False, False, False, True, False, False]  # a second sequence starting at 3
    assert mask.shape == (6, 12)
    assert mask[0, :6].tolist() == [True, True, False, False, False, False]  # block at 2 sees positions 0, 1
    assert mask[2, 6:].tolist() == [True, True, True, False, False, False]  # offset 2 sees its block's 0..2
    assert mask[3, 6:].tolist() == [False, False, False, True, False, False]  # the next block sees only itself


def sequences(n=6, length=30, prompt_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"id": f"p{i}", "sample": 0, "prompt_len": prompt_len,
             "tokens": torch.randint(3, 96, (length,), generator=g).tolist()} for i in range(n)]


@pytest.mark.parametrize("options", [[], ["--sequential_rank", "4", "--bidirectional", "--ce_weight", "0.1",
                                      "--offset_weights", "reached", "--lr_schedule", "constant"]])
def test_training_lowers_the_loss_and_leaves_the_target_unchanged(tmp_path, options):
    model = tiny_model()
    target = {k: v.clone() for k, v in model.state_dict().items()}
    # sequences the target itself wrote (greedy), as the real data are
    model.setup_caches(1, 64)
    seqs = []
    for i, prompt in enumerate([[3, 4, 5], [10, 11], [50, 7, 9, 2], [20], [33, 34], [60, 61, 62]]):
        out = s3d.ar_generate(model, prompt, 24).tokens
        seqs.append({"id": f"p{i}", "sample": 0, "prompt_len": len(prompt), "tokens": prompt + out})
    args = train_heads.parse_args(["--out", str(tmp_path / "h.safetensors"), "--steps", "30", "--lr", "1e-2",
                                   "--gamma", "3", "--batch_tokens", "96", "--eval_every", "30", *options])
    heads = new_heads(model, (2, 4), 3, 4, None, args.sequential_rank, args.bidirectional)
    train_heads.offset_weights(args)
    model.set_heads(heads)
    before_rates, before_tau = train_heads.evaluate(model, seqs, 3, 64)
    cost = train_heads.train(model, heads, seqs, seqs, args)
    log = [json.loads(line) for line in (tmp_path / "h.log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and cost["steps"] == 30
    assert sum(r["loss"] for r in log[-5:]) / 5 < 0.7 * sum(r["loss"] for r in log[:5]) / 5
    after_rates, after_tau = train_heads.evaluate(model, seqs, 3, 64)
    assert after_tau > before_tau
    for k, v in model.state_dict().items():
        if not k.startswith("heads."):
            assert torch.equal(v, target[k]), k
    # the saved file is what generate.py --s3d loads, and it drafts losslessly
    loaded = load_heads(tmp_path / "h.safetensors", model.config)
    assert loaded.meta["trained_steps"] == "30"
    assert (loaded.sequential_rank, loaded.bidirectional) == (args.sequential_rank, args.bidirectional)
    if args.sequential_rank:  # the sequential head trained too
        assert loaded.sequential_out.abs().max() > 0
    model.set_heads(loaded)
    for seq in seqs[:3]:
        prompt = seq["tokens"][: seq["prompt_len"]]
        assert s3d.speculative_generate(model, prompt, 24, s3d.Draft("s3d", 3)).tokens == seq["tokens"][seq["prompt_len"]:]


def test_resume_continues_where_it_stopped(tmp_path):
    def run(steps, resume):
        model = tiny_model()
        heads = new_heads(model, (2, 4), 2, 2)
        args = train_heads.parse_args(["--out", str(tmp_path / "h.safetensors"), "--steps", str(steps),
                                       "--gamma", "2", "--batch_tokens", "32", "--eval_every", "2"]
                                      + (["--resume"] if resume else []))
        args.offset_weights = [1.0, 1.0]
        train_heads.train(model, heads, sequences(), sequences(2, seed=1), args)
        return heads

    straight = run(4, False).state_dict()
    (tmp_path / "h.log.jsonl").unlink()
    run(2, False)
    with (tmp_path / "h.log.jsonl").open("a") as log:  # a step logged after the last save, then a torn line
        log.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    resumed = run(4, True).state_dict()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k])
    logged = [json.loads(line)["step"] for line in (tmp_path / "h.log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # each step once, the resumed run's step 3 instead of the dead one's


def test_a_planted_pickle_in_the_training_state_never_runs(tmp_path):
    from test_quantize import Payload

    marker = tmp_path / "ran"
    torch.save({"heads": Payload(marker)}, tmp_path / "h.train.pt")
    model = tiny_model()
    args = train_heads.parse_args(["--out", str(tmp_path / "h.safetensors"), "--steps", "2", "--gamma", "2",
                                   "--batch_tokens", "32", "--resume"])
    args.offset_weights = [1.0, 1.0]
    with pytest.raises(CheckpointError, match="posix.system, which a weights file may not"):
        train_heads.train(model, new_heads(model, (2, 4), 2, 2), sequences(), sequences(2, seed=1), args)
    assert not marker.exists()


class Tok:
    """A tokenizer of one token per character, whose chat template is the message itself."""
    eos_ids = {1}

    def encode(self, text, bos=True):
        return [3 + ord(c) % 90 for c in text]

    def apply_chat_template(self, messages):
        return messages[-1]["content"]


def test_self_distillation_is_cached_and_resumed(tmp_path, monkeypatch):
    model = tiny_model()
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}" * (i + 1)} for i in range(5)]
    seqs = train_heads.generate_data(model, Tok(), prompts[:3], tmp_path, 2, 8, 0.8, 2, False)
    assert len(seqs) == 6
    calls = []
    real = s3d.generate_batch
    monkeypatch.setattr(s3d, "generate_batch", lambda m, p, *a, **k: calls.append(set(map(tuple, p))) or real(m, p, *a, **k))
    seqs = train_heads.generate_data(model, Tok(), prompts, tmp_path, 2, 8, 0.8, 2, False)
    # only the two new prompts were answered: one batch of their greedy answers, one of their sampled ones
    new = {tuple(Tok().encode(p["prompt"])) for p in prompts[3:]}
    assert len(seqs) == 10 and calls == [new, new]
    assert sorted({s["id"] for s in seqs}) == [p["id"] for p in prompts]
    with pytest.raises(train_heads.UsageError, match="other settings"):
        train_heads.generate_data(model, Tok(), prompts, tmp_path, 3, 8, 0.8, 2, False)


def test_a_run_killed_while_writing_its_cache_leaves_the_cache_as_it_was(tmp_path, monkeypatch):
    """The cache is written whole under a temporary name and renamed: killed mid-write, the old file stands."""
    model = tiny_model()
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(4)]
    train_heads.generate_data(model, Tok(), prompts[:2], tmp_path, 1, 4, 0.8, 2, False)
    before = (tmp_path / "sequences.jsonl").read_text()
    real_write = Path.write_text

    def killed_mid_write(self, text, *args, **kwargs):  # the sequences' write stops short; others go through
        if "sequences" not in self.name:
            return real_write(self, text, *args, **kwargs)
        real_write(self, text[:-10], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train_heads.generate_data(model, Tok(), prompts, tmp_path, 1, 4, 0.8, 2, False)
    monkeypatch.undo()
    assert (tmp_path / "sequences.jsonl").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "sequences.jsonl"]  # no temporary file left


def test_a_cache_cut_off_mid_line_is_completed_and_a_corrupt_one_named(tmp_path):
    """A cache that ends in half a line (an older version, killed while appending): the next run drops it, remakes
    that answer and adds it after a whole line; a line broken in the middle of the file is a one-line error naming
    the file and line."""
    model = tiny_model()
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(3)]
    whole = train_heads.generate_data(model, Tok(), prompts, tmp_path, 1, 8, 0.8, 4, False)
    path = tmp_path / "sequences.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rfind("\n", 0, -1) + 20])  # the last row cut after 19 characters
    again = train_heads.generate_data(model, Tok(), prompts, tmp_path, 1, 8, 0.8, 4, False)
    key = lambda s: (s["id"], s["sample"])  # noqa: E731
    assert sorted(again, key=key) == sorted(whole, key=key)  # greedy answers: the remade one is the same
    assert [json.loads(line) for line in path.read_text().splitlines()] == again
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:19], *lines[2:]]) + "\n")
    with pytest.raises(train_heads.UsageError, match="sequences.jsonl, line 2: not JSON"):
        train_heads.generate_data(model, Tok(), prompts, tmp_path, 1, 8, 0.8, 4, False)


@pytest.mark.parametrize("flags,message", [
    (["--gamma", "0"], "--gamma must be at least 1"),
    (["--offset_weights", "1,1"], "--offset_weights needs 4"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--data_temperature", "nan"], "--data_temperature must be a positive number"),
    (["--limit", "-5"], "--limit must be at least 20"),
    (["--offset_weights", "1,nan,1,1"], "--offset_weights needs 4"),
    (["--offset_weights", "a,b,c,d"], "--offset_weights needs 4 numbers"),
    (["--rank", "1000000000"], "--rank and --sequential_rank may be at most 576"),
    (["--sequential_rank", "1000"], "--rank and --sequential_rank may be at most 576"),
    (["--sequential_rank", "-1"], "--sequential_rank must be at least 0"),
    (["--ce_weight", "-0.1"], "--ce_weight must be a number >= 0"),
    (["--skip", "auto:x"], "expected auto:N"),
    (["--skip", "auto:30"], "--skip auto:N needs 1 <= N < 30"),
    (["--init", "h.safetensors", "--bidirectional"], "--init takes the heads' own skip range"),
    (["--resume"], "nothing to resume"),
    (["--skip", "5"], "expected S:E"),
    (["--synth_prompts", "3", "--synth_followups", "4"], "--synth_followups must be between 0 and --synth_prompts (3)"),
    (["--train_sequences", "0"], "--train_sequences must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--draft_vocab", "0"], "--draft_vocab must be at least 1"),
    (["--eval_anchors", "0"], "--eval_anchors must be at least 1"),
    (["--init", "h.safetensors", "--skip", "1:3"], "--init takes the heads' own skip range"),
])
def test_cli_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train_heads.main(["--out", str(tmp_path / "h.safetensors"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # (after informational lines, such as the dtype's)
    assert message in err and "Traceback" not in err and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]


def test_outputs_are_refused_before_any_work(tmp_path, capsys):
    """An existing heads file (the shipped ones, say) is kept unless --force, and an unwritable --out is noticed
    at the start, not at the first save after minutes of training."""
    shipped = tmp_path / "h.safetensors"
    shipped.write_bytes(b"trained for hours")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    for out, message in ((shipped, "h.safetensors exists: pass --force"),
                         (locked / "h.safetensors", "locked is not a writable folder")):
        if out.parent == locked and os.geteuid() == 0:
            continue  # root may write anywhere
        with pytest.raises(SystemExit) as e:
            train_heads.main(["--out", str(out), "--checkpoint", str(tmp_path / "no-such-model")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert shipped.read_bytes() == b"trained for hours"


def test_init_heads_keep_their_options_and_a_sequential_head_widens_its_draft_vocabulary(tmp_path, capsys,
                                                                                         tiny_checkpoint):
    """--init with --draft_vocab rebuilds the heads with the vocabulary and keeps their bidirectional block. Heads
    with a sequential head (whose output rows are their own draft vocabulary's) keep that vocabulary first, with its
    trained rows, and widen it (new rows zero); fewer tokens, or heads whose sequential head covers the whole
    vocabulary, are refused before any data are made."""
    import cli

    model, _ = cli.load(tiny_checkpoint, torch.device("cpu"), torch.float32)
    new_heads(model, (1, 3), 2, 0, bidirectional=True).save(tmp_path / "bidirectional.safetensors")
    new_heads(model, (1, 3), 2, 0, sequential_rank=2).save(tmp_path / "sequential.safetensors")
    trained = new_heads(model, (1, 3), 2, 0, draft_vocab=torch.tensor([9, 4, 30, 2, 7]), sequential_rank=2)
    torch.nn.init.normal_(trained.sequential_out)
    trained.save(tmp_path / "trained.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}."}) + "\n" for i in range(20)))
    common = ["--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--steps", "0", "--samples", "1",
              "--data_max_new_tokens", "2", "--device", "cpu", "--dtype", "float32"]
    for heads, k, message in (("sequential", "8", "trained on the whole vocabulary"), ("trained", "4", "give at least 5")):
        with pytest.raises(SystemExit) as e:
            train_heads.main(["--init", str(tmp_path / f"{heads}.safetensors"), "--out", str(tmp_path / "s.safetensors"),
                              "--data_dir", str(tmp_path / "s-data"), "--draft_vocab", k, *common])
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "s-data").exists()
    train_heads.main(["--init", str(tmp_path / "bidirectional.safetensors"), "--out", str(tmp_path / "b.safetensors"),
                      "--data_dir", str(tmp_path / "b-data"), "--draft_vocab", "8", *common])
    rebuilt = load_heads(tmp_path / "b.safetensors", model.config)
    assert rebuilt.bidirectional and len(rebuilt.draft_vocab) == 8
    train_heads.main(["--init", str(tmp_path / "trained.safetensors"), "--out", str(tmp_path / "w.safetensors"),
                      "--data_dir", str(tmp_path / "b-data"), "--draft_vocab", "12", *common])
    widened = load_heads(tmp_path / "w.safetensors", model.config)
    assert len(widened.draft_vocab) == 12 and len(set(widened.draft_vocab.tolist())) == 12
    assert widened.draft_vocab[:5].tolist() == [9, 4, 30, 2, 7]
    assert torch.equal(widened.sequential_out[:5], trained.sequential_out) and not widened.sequential_out[5:].any()
    assert torch.equal(widened.sequential_in, trained.sequential_in)
    assert "draft vocabulary: 12 tokens, its 5 tokens and the most frequent others" in capsys.readouterr().out


def test_init_heads_take_a_new_sequential_head(tmp_path, capsys, tiny_checkpoint):
    """--init with --sequential_rank keeps every trained tensor of the file (adapters, masks, draft vocabulary) and
    adds an untrained sequential head (it changes nothing until trained); heads that have one are refused."""
    import cli

    model, _ = cli.load(tiny_checkpoint, torch.device("cpu"), torch.float32)
    trained = new_heads(model, (1, 3), 3, 2, draft_vocab=torch.arange(8))
    for p in trained.parameters():
        torch.nn.init.normal_(p)
    trained.save(tmp_path / "trained.safetensors")
    new_heads(model, (1, 3), 2, 0, sequential_rank=2).save(tmp_path / "sequential.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}."}) + "\n" for i in range(20)))
    common = ["--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--sequential_rank", "3", "--steps", "0",
              "--samples", "1", "--data_max_new_tokens", "2", "--device", "cpu", "--dtype", "float32",
              "--data_dir", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as e:
        train_heads.main(["--init", str(tmp_path / "sequential.safetensors"), "--out", str(tmp_path / "s.safetensors"),
                          *common])
    assert e.value.code == 2 and "has a sequential head already" in capsys.readouterr().err
    train_heads.main(["--init", str(tmp_path / "trained.safetensors"), "--out", str(tmp_path / "t.safetensors"), *common])
    rebuilt = load_heads(tmp_path / "t.safetensors", model.config)
    assert (rebuilt.skip, rebuilt.gamma, rebuilt.rank, rebuilt.sequential_rank) == ((1, 3), 3, 2, 3)
    assert rebuilt.sequential_out.shape == (8, 3) and not rebuilt.sequential_out.any()
    state = rebuilt.state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_init_heads_widen_their_adapters_to_a_higher_rank(tmp_path, capsys, tiny_checkpoint):
    """--init with a higher --rank keeps the file's adapter directions and adds new ones as a new adapter starts
    (A random, B zero), so every adapter's B A, and with it the draft, is unchanged until trained; a lower rank is
    refused before any data are made."""
    import cli

    model, _ = cli.load(tiny_checkpoint, torch.device("cpu"), torch.float32)
    trained = new_heads(model, (1, 3), 3, 2, sequential_rank=2)
    for p in trained.parameters():
        torch.nn.init.normal_(p)
    trained.save(tmp_path / "trained.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}."}) + "\n" for i in range(20)))
    common = ["--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--steps", "0", "--samples", "1",
              "--data_max_new_tokens", "2", "--device", "cpu", "--dtype", "float32", "--init",
              str(tmp_path / "trained.safetensors")]
    with pytest.raises(SystemExit) as e:
        train_heads.main(["--rank", "1", "--out", str(tmp_path / "n.safetensors"), "--data_dir",
                          str(tmp_path / "n-data"), *common])
    assert e.value.code == 2 and "has adapters of rank 2" in capsys.readouterr().err
    assert not (tmp_path / "n-data").exists()
    train_heads.main(["--rank", "5", "--out", str(tmp_path / "w.safetensors"), "--data_dir", str(tmp_path / "w-data"),
                      *common])
    widened = load_heads(tmp_path / "w.safetensors", model.config)
    assert (widened.skip, widened.gamma, widened.rank, widened.sequential_rank) == ((1, 3), 3, 5, 2)
    for i, layer in trained.adapters.items():
        for name, adapter in layer.items():
            new = widened.adapters[i][name]
            assert new.A.shape == (5, adapter.A.shape[1]) and new.B.shape == (adapter.B.shape[0], 5)
            assert torch.equal(new.A[:2], adapter.A) and torch.equal(new.B[:, :2], adapter.B)
            assert new.A[2:].abs().min() > 0 and not new.B[:, 2:].any()
            torch.testing.assert_close(new.B @ new.A, adapter.B @ adapter.A)
    for name in ("mask_embeddings", "sequential_in", "sequential_out"):
        assert torch.equal(getattr(widened, name), getattr(trained, name)), name


def test_training_prompts_are_not_evaluation_prompts():
    train = {train_heads.normalized(r["prompt"]) for r in train_heads.read_prompts(train_heads.TRAIN_PROMPTS)}
    evaluation = train_heads.evaluation_prompts()
    assert len(train) > 400 and len(evaluation) > 300
    assert not train & evaluation


def test_synthetic_prompts_keep_whole_new_messages_only(tmp_path, monkeypatch):
    """Magpie prompts: sampled after the chat template's user-turn opening; a message cut off before EOS, a short
    one, a repeat and an evaluation prompt are all dropped; a second run asks only for what is missing."""
    class Tok:
        eos_ids = {1}

        def encode(self, text, bos=True):
            return [3 + ord(c) % 90 for c in text]

        def decode(self, tokens, skip_special=False):
            return "".join(chr(t) for t in tokens)

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return "<user>" + messages[-1]["content"] + "</user>" + ("<assistant>" if add_generation_prompt else "")

    def message(text, eos=True):
        return [ord(c) for c in text] + ([1] if eos else [])

    batches = [[message("tell me a joke"), message("tell me a joke"), message("cut off before the end", eos=False),
                message("hi"), message("Evaluation prompt here"), message("write a short poem")],
               [message("explain how tides work")] * 6]
    seen_prefixes = []

    def fake_generate_batch(model, prompts, *args, **kwargs):
        seen_prefixes.append(prompts[0])
        return batches.pop(0)

    monkeypatch.setattr(s3d, "generate_batch", fake_generate_batch)
    model = tiny_model()
    rows = train_heads.synth_prompts(model, Tok(), 2, tmp_path, 6, False, {"evaluation prompt here"})
    assert [r["prompt"] for r in rows] == ["tell me a joke", "write a short poem"]
    assert seen_prefixes == [Tok().encode("<user>")]  # the user turn's opening, nothing of the content
    rows = train_heads.synth_prompts(model, Tok(), 3, tmp_path, 6, False, set())
    assert [r["prompt"] for r in rows] == ["tell me a joke", "write a short poem", "explain how tides work"]


def test_follow_up_turns_continue_the_models_own_conversations(tmp_path, monkeypatch):
    """Multi-turn data: a follow-up is sampled after the synthetic prompt, the model's greedy answer and the next user
    turn's opening; one that is dropped is not retried in that run; a second run asks only for what is missing; and
    generate_data answers a follow-up after its history."""
    class ChatTok:
        eos_ids = {1}

        def encode(self, text, bos=True):
            return [ord(c) % 90 + 3 for c in text]

        def decode(self, tokens, skip_special=False):
            return "".join(chr(t) for t in tokens if not (skip_special and t in self.eos_ids))

        def apply_chat_template(self, messages, add_generation_prompt=True):
            text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
            return text + ("<assistant>" if add_generation_prompt else "")

    def message(text, eos=True):
        return [ord(c) for c in text] + ([1] if eos else [])

    synth = [{"id": f"synth_{i}", "prompt": p} for i, p in enumerate(["tell me a joke", "write a poem", "explain tides"])]
    sequences = [{"id": r["id"], "sample": k, "prompt_len": 3, "tokens": [9, 9, 9] + message(f"answer {i}.{k}")}
                 for i, r in enumerate(synth) for k in range(2)]
    batches = [[message("and why is that funny?"), message("hi")],
               [message("what does the moon do?"), message("a padding row's sample")],
               [message("make it rhyme please")] * 2]
    seen_prefixes = []

    def fake_generate_batch(model, prompts, *args, **kwargs):
        seen_prefixes.append(prompts)
        return batches.pop(0)

    monkeypatch.setattr(s3d, "generate_batch", fake_generate_batch)
    model, tok = tiny_model(), ChatTok()
    rows = train_heads.synth_followups(model, tok, synth, sequences, 2, tmp_path, 2, False, set())
    opening = "<user>{}</user><assistant>answer {}.0</assistant><user>"  # the greedy answer, not the sampled one
    assert seen_prefixes[0] == [tok.encode(opening.format("tell me a joke", 0)), tok.encode(opening.format("write a poem", 1))]
    assert seen_prefixes[1][0] == tok.encode(opening.format("explain tides", 2))
    assert [(r["id"], r["prompt"]) for r in rows] == [("synth_0_followup", "and why is that funny?"),
                                                      ("synth_2_followup", "what does the moon do?")]
    assert rows[0]["history"] == [{"role": "user", "content": "tell me a joke"},
                                  {"role": "assistant", "content": "answer 0.0"}]
    seen_prefixes.clear()
    rows = train_heads.synth_followups(model, tok, synth, sequences, 3, tmp_path, 2, False, set())
    assert seen_prefixes == [[tok.encode(opening.format("write a poem", 1))] * 2]
    assert [r["id"] for r in rows] == ["synth_0_followup", "synth_2_followup", "synth_1_followup"]
    monkeypatch.undo()
    answered = train_heads.generate_data(model, tok, rows[:1], tmp_path / "answers", 1, 4, 0.8, 1, False)
    history = [*rows[0]["history"], {"role": "user", "content": "and why is that funny?"}]
    assert answered[0]["tokens"][:answered[0]["prompt_len"]] == tok.encode(tok.apply_chat_template(history))
