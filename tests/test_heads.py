"""heads.py: the draft adapters never touch the target, heads files carry their identity and round-trip, and the
skip range and g rules refuse what cannot work."""
import pytest
import torch

from checkpoint import CheckpointError, UsageError
import s3d
from heads import (DraftHeads, check_gamma, int8_per_channel, load_heads, most_frequent_tokens, new_heads,
                   widened_draft_vocab)
from model import int8_rows
from test_s3d import PROMPTS, tiny_model, with_trained_looking_heads


def test_heads_leave_the_target_unchanged(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        model.setup_caches(1, 64)
        plain = model(tokens, torch.arange(30))
        with_trained_looking_heads(model).heads.save(tmp_path / "h.safetensors")
        model.set_heads(load_heads(tmp_path / "h.safetensors", model.config))
        after = model(tokens, torch.arange(30))
        drafted = model(tokens[:, :1], torch.arange(4), draft=True)
    assert torch.equal(plain, after), "the full forward must be bit-identical with heads attached"
    assert not torch.equal(drafted[0, 0], plain[0, 0]), "the draft forward should differ"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    extra = sum(p.numel() for p in model.heads.parameters())
    assert extra == sum(p.numel() for p in model.parameters()) - sum(v.numel() for v in before.values())


def test_heads_roundtrip_and_identity_checks(tmp_path):
    model = with_trained_looking_heads(tiny_model(), skip=(1, 4), gamma=3, rank=2)
    model.config.fingerprint = "a" * 32
    model.heads.meta["base_fingerprint"] = "a" * 32
    model.heads.save(tmp_path / "h.safetensors")
    loaded = load_heads(tmp_path / "h.safetensors", model.config)
    assert (loaded.skip, loaded.gamma, loaded.rank) == ((1, 4), 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.heads.state_dict().values()))
    other = tiny_model(seed=3)
    other.config.fingerprint = "b" * 32
    with pytest.raises(CheckpointError, match="trained for tiny-0"):
        load_heads(tmp_path / "h.safetensors", other.config)
    for heads_print, model_print in (("", "a" * 32), ("a" * 32, "")):  # a fingerprint missing on either side
        model.heads.meta["base_fingerprint"], other.config.fingerprint = heads_print, model_print
        model.heads.save(tmp_path / "h2.safetensors")
        with pytest.raises(CheckpointError, match="record no weights fingerprint and the heads' base model 'tiny-0'"):
            load_heads(tmp_path / "h2.safetensors", other.config)
        other.config.name = "tiny-0"  # the same name and shapes: accepted
        load_heads(tmp_path / "h2.safetensors", other.config)
        other.config.name = "tiny-3"
    wide = tiny_model(dim=32)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_heads(tmp_path / "h.safetensors", wide.config)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read heads file"):
        load_heads(tmp_path / "bad.safetensors", model.config)


def test_heads_metadata_must_agree_with_the_tensors(tmp_path):
    """A heads file whose metadata lacks skip/gamma/rank, or claims a gamma or rank of 10^9, is refused in one line
    before anything is allocated from it."""
    from safetensors.torch import load_file, save_file

    model = with_trained_looking_heads(tiny_model(), skip=(1, 4), gamma=3, rank=2)
    model.heads.save(tmp_path / "h.safetensors")
    tensors = load_file(tmp_path / "h.safetensors")
    good = {"format": "s3d-heads", "skip": "1:4", "gamma": "3", "rank": "2"}
    for change, message in (({"gamma": None}, "lacks its skip"), ({"skip": "x"}, "lacks its skip"),
                            ({"gamma": str(10**9)}, "gamma 1000000000 and rank 2"),
                            ({"rank": str(10**9)}, "gamma 3 and rank 1000000000"),
                            ({"skip": "3:1"}, "invalid skip range 3:1")):
        meta = {k: v for k, v in (good | change).items() if v is not None}
        save_file(tensors, str(tmp_path / "x.safetensors"), metadata=meta)
        with pytest.raises(UsageError, match=message):
            load_heads(tmp_path / "x.safetensors", model.config)


def test_sequential_head_and_bidirectional_flag_roundtrip(tmp_path):
    """Both options survive a save and load (heads from before them load as plain heads), and a file whose
    sequential rank disagrees with its tensors is refused."""
    from safetensors.torch import load_file, save_file

    model = with_trained_looking_heads(tiny_model(), skip=(1, 4), gamma=3, rank=2, sequential_rank=5, bidirectional=True)
    model.heads.save(tmp_path / "h.safetensors")
    loaded = load_heads(tmp_path / "h.safetensors", model.config)
    assert (loaded.sequential_rank, loaded.bidirectional) == (5, True)
    assert torch.equal(loaded.sequential_out, model.heads.sequential_out.float())
    tensors = load_file(tmp_path / "h.safetensors")
    old = {"format": "s3d-heads", "skip": "1:4", "gamma": "3", "rank": "2", "base_model": "tiny-0"}
    plain = {k: v for k, v in tensors.items() if not k.startswith("sequential")}
    save_file(plain, str(tmp_path / "old.safetensors"), metadata=old)
    assert (lambda h: (h.sequential_rank, h.bidirectional))(load_heads(tmp_path / "old.safetensors", model.config)) == (0, False)
    for files_tensors, meta, message in ((tensors, old, "sequential rank 0 in its metadata"),
                                         (plain, old | {"sequential_rank": "5"}, "sequential rank 5"),
                                         (tensors, old | {"sequential_rank": "4"}, "sequential rank 4"),
                                         (plain, old | {"bidirectional": "yes"}, "must be 0 or 1")):
        save_file(files_tensors, str(tmp_path / "x.safetensors"), metadata=meta)
        with pytest.raises(UsageError, match=message):
            load_heads(tmp_path / "x.safetensors", model.config)


def test_skip_and_gamma_rules():
    model = tiny_model()
    with pytest.raises(UsageError, match="invalid skip range 4:2"):
        DraftHeads(model.config, (4, 2), 3, 2)
    with pytest.raises(UsageError, match="invalid skip range 0:6"):
        DraftHeads(model.config, (0, 6), 3, 2)
    heads = new_heads(model, (2, 4), 3, 2)
    assert check_gamma(3, heads) == 3 and check_gamma(7) == 7
    with pytest.raises(UsageError, match="gamma 4 exceeds the 3 tokens these heads draft"):
        check_gamma(4, heads)
    with pytest.raises(UsageError, match="gamma must be at least 1"):
        check_gamma(0)


def test_draft_vocabulary_roundtrips_and_is_checked(tmp_path):
    model = tiny_model()
    vocab = torch.tensor([5, 1, 90, 42])
    new_heads(model, (2, 4), 3, 2, vocab).save(tmp_path / "h.safetensors")
    loaded = load_heads(tmp_path / "h.safetensors", model.config)
    assert loaded.draft_vocab.dtype == torch.int64 and loaded.draft_vocab.tolist() == [5, 1, 90, 42]
    model.set_heads(loaded)
    assert torch.equal(loaded.draft_head, model.output.weight[vocab])  # the draft's head: those rows, in that order
    assert "draft_head" not in loaded.state_dict()  # a copy of the model's rows, never saved with the heads
    for bad in (torch.tensor([1, 1]), torch.tensor([96]), torch.tensor([-1]), torch.tensor([1.0]), torch.tensor([], dtype=torch.int64)):
        with pytest.raises(CheckpointError, match="draft vocabulary"):
            DraftHeads(model.config, (2, 4), 3, 2, draft_vocab=bad)


def test_most_frequent_tokens_breaks_ties_by_the_lower_id():
    assert most_frequent_tokens([[7, 7, 3, 9], [9, 7]], 4, 12).tolist() == [7, 9, 3, 0]
    with pytest.raises(UsageError, match="1 to 12 tokens"):
        most_frequent_tokens([[1]], 13, 12)


def test_a_widened_draft_vocabulary_keeps_the_old_one_first():
    """A sequential head's output rows are its draft vocabulary's, in order: widening keeps those tokens where they
    are and appends the most frequent ones they lack; fewer tokens than before are refused."""
    old, ranked = torch.tensor([7, 2, 40]), torch.tensor([2, 9, 7, 1, 40, 3])
    assert widened_draft_vocab(old, ranked, 5).tolist() == [7, 2, 40, 9, 1]
    assert widened_draft_vocab(old, ranked, 3).tolist() == [7, 2, 40]
    with pytest.raises(UsageError, match="give at least 3"):
        widened_draft_vocab(old, ranked, 2)


def test_folded_adapters_draft_the_same_logits():
    """fold_adapters: W + BA as one matrix is the same function as Wx + B(Ax)."""
    model = with_trained_looking_heads(tiny_model())
    model.setup_caches(1, 64)
    with torch.no_grad():
        s3d.prefill(model, torch.tensor([PROMPTS[2][:10]]), torch.arange(10))
        draft = lambda: model(torch.tensor([[5]]), torch.arange(10, 14), draft=True)  # noqa: E731
        plain = draft()
        model.heads.fold_adapters(True)
        folded = draft()
        model.heads.fold_adapters(False)
        adapters, model.heads.adapters = model.heads.adapters, None
        without = draft()
        model.heads.adapters = adapters
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(without, plain, atol=1e-3)  # the adapters do change the draft


def test_int8_per_channel_rounds_each_weight_to_its_rows_scale():
    weight = torch.randn(7, 33) * torch.logspace(-3, 1, 7)[:, None]  # rows of very different sizes
    q, scale = int8_per_channel(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale.shape == (7,)
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


def test_int8_copies_draft_what_the_folded_adapters_do_and_the_target_never_reads_them():
    """fold_adapters(True, model): the draft reads int8 copies of W + BA, so its logits are the folded draft's up to
    int8 rounding, not the same tensors; the full forward is untouched."""
    model = with_trained_looking_heads(tiny_model())
    model.setup_caches(1, 64)
    tokens = torch.tensor([PROMPTS[2][:10]])
    with torch.no_grad():
        full = model(tokens, torch.arange(10))
        draft = lambda: model(torch.tensor([[5]]), torch.arange(10, 14), draft=True)  # noqa: E731
        model.heads.fold_adapters(True)
        folded = draft()
        model.heads.fold_adapters(True, model)
        int8 = draft()
        adapter = model.heads.adapters["0"]["w1"]
        assert adapter.weight_int8.dtype == torch.int8 and model.heads.int8
        assert torch.equal(model(tokens, torch.arange(10)), full), "the full forward must not read the copies"
        model.heads.fold_adapters(True, model)  # again: the same copies (a compiled draft would otherwise recompile)
        assert model.heads.adapters["0"]["w1"].weight_int8 is adapter.weight_int8
        model.heads.fold_adapters(True)
        assert adapter.weight_int8 is None and torch.equal(draft(), folded)
    assert not torch.equal(int8, folded), "the draft should have read the int8 copies"
    assert (int8 - folded).norm() < 0.05 * folded.norm()  # (a wrong scale or layout gives errors of order 1)


def test_the_int8_draft_reads_an_int8_copy_of_its_draft_head():
    """With a draft vocabulary, fold_adapters(True, model) makes an int8 copy of the draft head's rows too, and the
    draft's logits are those of the copy: the folded draft's hidden states (rounded to 8 bits) times the rounded
    rows."""
    model = with_trained_looking_heads(tiny_model())
    heads = model.heads
    heads.draft_vocab = torch.tensor([3, 17, 40, 41, 60, 2, 95, 8])
    model.set_heads(heads)  # copies the draft head's rows
    model.setup_caches(1, 64)
    hidden = {}
    model.norm.register_forward_hook(lambda module, args, out: hidden.update(x=out))
    with torch.no_grad():
        s3d.prefill(model, torch.tensor([PROMPTS[2][:10]]), torch.arange(10))
        draft = lambda: model(torch.tensor([[5]]), torch.arange(10, 14), draft=True)  # noqa: E731
        heads.fold_adapters(True)
        folded = draft()
        assert heads.draft_head_int8 is None
        heads.fold_adapters(True, model)
        int8 = draft()
        assert heads.draft_head_int8.dtype == torch.int8 and heads.draft_head_int8.shape == (8, model.config.dim)
        rounded = heads.draft_head_int8.float() * heads.draft_head_scale.float()[:, None]
        rows, step = int8_rows(hidden["x"])  # (the rows an int8 map multiplies are rounded to 8 bits too)
        torch.testing.assert_close(int8, (rows * step) @ rounded.T, rtol=1e-5, atol=1e-5)
        assert ((rounded - heads.draft_head).abs() <= heads.draft_head_scale[:, None] / 2 * (1 + 1e-6)).all()
        heads.fold_adapters(True)
        assert heads.draft_head_int8 is None and torch.equal(draft(), folded)
    assert int8.shape == folded.shape == (1, 4, 8) and not torch.equal(int8, folded)
