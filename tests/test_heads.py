"""heads.py: the draft adapters never touch the target, heads files carry their identity and round-trip, and the
skip range and g rules refuse what cannot work."""
import pytest
import torch

from checkpoint import CheckpointError, UsageError
from heads import DraftHeads, check_gamma, load_heads, new_heads
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
    wide = tiny_model(dim=32)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_heads(tmp_path / "h.safetensors", wide.config)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read heads file"):
        load_heads(tmp_path / "bad.safetensors", model.config)


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
