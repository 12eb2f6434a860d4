"""model.py against transformers as the independent reference: logits of prefill and incremental decoding, the
skip path, RoPE variants; plus the static KV cache's behaviour and the few-row linear maps of compiled CPU steps."""
import re

import pytest
import torch

from checkpoint import CheckpointError, load_model
from model import ModelArgs, Transformer
from scripts.hf_format import config_from_hf

FAMILIES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"]
# Llama variants that exercise the other code paths: tied embeddings (Llama 3.2, SmolLM2), Llama-3.1 RoPE scaling.
LLAMA_VARIANTS = {
    "tied": dict(tie_word_embeddings=True),
    "llama3.1-rope": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "head_dim": dict(head_dim=32),  # head_dim * n_head != hidden_size, as in some Qwen/Gemma-like configs
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def check_against_reference(hf, folder, prefill_len=12, decode_steps=8):
    torch.manual_seed(1)
    tokens = torch.randint(0, hf.config.vocab_size, (1, prefill_len + decode_steps))
    with torch.no_grad():
        ref = hf(tokens).logits
        model = load_model(folder, "cpu", torch.float32)
        model.setup_caches(1, 64)
        ours = [model(tokens[:, :prefill_len], torch.arange(prefill_len))]
        for i in range(prefill_len, prefill_len + decode_steps):  # one token at a time, reading the KV cache
            ours.append(model(tokens[:, i:i + 1], torch.tensor([i])))
    ours = torch.cat(ours, dim=1)
    assert rel_err(ours[:, :prefill_len], ref[:, :prefill_len]) < 1e-4, "prefill logits differ"
    assert rel_err(ours[:, prefill_len:], ref[:, prefill_len:]) < 1e-4, "incremental decode logits differ"


@pytest.mark.parametrize("arch", FAMILIES)
def test_logits_match_transformers(convert_tiny, arch):
    check_against_reference(*convert_tiny(arch))


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_variants_match_transformers(convert_tiny, variant):
    check_against_reference(*convert_tiny("LlamaForCausalLM", **LLAMA_VARIANTS[variant]))


@pytest.mark.parametrize("arch", FAMILIES)
def test_skip_path_equals_model_without_those_layers(convert_tiny, arch):
    hf, folder = convert_tiny(arch)
    s, e = 2, 4
    hf.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(hf.model.layers) if not s <= i < e)
    hf.config.num_hidden_layers = len(hf.model.layers)
    if getattr(hf.config, "layer_types", None):
        hf.config.layer_types = [t for i, t in enumerate(hf.config.layer_types) if not s <= i < e]
    tokens = torch.randint(0, hf.config.vocab_size, (1, 10))
    with torch.no_grad():
        ref = hf(tokens, use_cache=False).logits
        model = load_model(folder, "cpu", torch.float32)
        model.setup_caches(1, 16)
        ours = model(tokens, torch.arange(10), skip=(s, e))
        full = model(tokens, torch.arange(10))
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(full, ref) > 1e-2, "skipping layers should change the logits"


def test_stale_cache_entries_are_never_attended(convert_tiny):
    """What a draft writes beyond the current position must not change later results: the speculative loop relies
    on this instead of rolling the cache back. (Compared with the same forward on a clean cache: a 12-token and a
    4-token forward may round differently, on CPUs whose matmul kernels block rows differently.)"""
    _, folder = convert_tiny("LlamaForCausalLM")
    model = load_model(folder, "cpu", torch.float32)
    tokens = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        model.setup_caches(1, 32)
        model(tokens[:, :8], torch.arange(8))
        clean = model(tokens[:, 8:], torch.arange(8, 12))
        model.setup_caches(1, 32)
        model(tokens[:, :8], torch.arange(8))
        model(torch.randint(0, 96, (1, 6)), torch.arange(12, 18))  # garbage written at positions 12..17
        again = model(tokens[:, 8:], torch.arange(8, 12))  # 12..17 stay stale
    assert torch.equal(again, clean)


def test_last_only_gives_the_last_positions_logits(convert_tiny):
    """A prefill asks for its last position's logits only (last_only): the same numbers as the full forward's last
    row, for every row of a batch."""
    _, folder = convert_tiny("LlamaForCausalLM")
    model = load_model(folder, "cpu", torch.float32)
    tokens = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        model.setup_caches(2, 16)
        full = model(tokens, torch.arange(9))
        model.setup_caches(2, 16)
        last = model(tokens, torch.arange(9), last_only=True)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_unknown_architecture_is_refused():
    with pytest.raises(CheckpointError, match="unknown architecture 'GPT2LMHeadModel'"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"]})


def test_unsupported_rope_scaling_is_refused():
    config = dict(architectures=["LlamaForCausalLM"], vocab_size=8, num_hidden_layers=1, num_attention_heads=1,
                  hidden_size=8, intermediate_size=8, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="'yarn' is not supported"):
        config_from_hf(config)


def test_sliding_window_caps_the_context():
    config = dict(architectures=["MistralForCausalLM"], vocab_size=8, num_hidden_layers=1, num_attention_heads=1,
                  hidden_size=8, intermediate_size=8, max_position_embeddings=32768, sliding_window=4096)
    assert config_from_hf(config).block_size == 4096


def test_setup_caches_refuses_more_than_the_context():
    model = Transformer(ModelArgs(block_size=16, vocab_size=8, n_layer=1, n_head=1, dim=8, intermediate_size=8))
    with pytest.raises(ValueError, match="exceed the model's context of 16"):
        model.setup_caches(1, 17)


def test_gemv_is_the_linear_map_row_by_row_on_bfloat16_weights(monkeypatch):
    """Compiled as the decoding steps are (bfloat16 on a CPU), a linear map of up to GEMV_MAX_ROWS rows is model.gemv:
    x @ W.T within bfloat16 rounding (for int8 weights, x's rows rounded to 8 bits, times the scales); each row's result is the same bit for bit
    whether it comes alone or with others (so a 1-token AR step and a 5-token verify round alike); its kernel reads
    the bfloat16 weight itself, not a float32 copy that freezing made, and calls no library GEMM. One row more and
    the library's GEMM (oneDNN) takes over. (All without the AVX512_BF16 and AVX512_VNNI kernels, which
    tests/test_cpu_kernels.py tests.)"""
    import cpu_kernels
    import model as model_py
    import s3d
    from torch._inductor.utils import run_and_get_code

    cpu_kernels.load()  # (built now, if at all, so that it stays off below)
    monkeypatch.setattr(model_py, "DOT_BF16", False)
    monkeypatch.setattr(model_py, "DOT_INT8", False)

    def frozen_weight_types(code: list[str]) -> set[str]:  # what the generated kernels read the frozen weights as
        return set(re.findall(r"\(const ([\w:]+)\*\)\(_frozen_param", " ".join(code)))

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16).eval()
    step = s3d.compiled(lambda layer, x: model_py.linear(layer, x, None, "w"), "cpu", False, False)
    x = torch.randn(1, model_py.GEMV_MAX_ROWS + 1, 64, dtype=torch.bfloat16)
    rows = model_py.GEMV_MAX_ROWS
    with torch.no_grad():
        few, code = run_and_get_code(step, layer, x[:, :rows])
        alone = [step(layer, x[:, i:i + 1]) for i in range(rows)]
        more, code_more = run_and_get_code(step, layer, x)
        expected = x.float() @ layer.weight.float().T
    torch.testing.assert_close(few.float(), expected[:, :rows], rtol=1e-2, atol=1e-2)
    assert all(torch.equal(alone[i][0, 0], few[0, i]) for i in range(rows))
    assert frozen_weight_types(code) == {"at::BFloat16"} and "mkldnn" not in " ".join(code)
    assert "mkldnn" in " ".join(code_more)  # (oneDNN's prepacked weight is no longer a frozen_param pointer)
    torch.testing.assert_close(more.float(), expected, rtol=1e-2, atol=1e-2)
    assert not model_py.use_gemv(x[:, :1], layer.weight)  # eager: the library's

    weight_int8 = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    scale = torch.rand(48, dtype=torch.bfloat16) / 100
    int8_step = s3d.compiled(lambda x, w, s: model_py.gemv(x, w, s), "cpu", False, False)
    with torch.no_grad():
        y = int8_step(x[:, :2], weight_int8, scale)
    rows_int8, step = model_py.int8_rows(x[:, :2].float())  # (with int8 weights the rows are rounded too)
    torch.testing.assert_close(y.float(), ((rows_int8 * step) @ weight_int8.float().T) * scale.float(), rtol=1e-2,
                               atol=1e-2)


def test_many_bfloat16_rows_multiply_in_float32_on_a_cpu_without_native_bf16(monkeypatch):
    """With model.FLOAT32_MATMUL (cli.load sets it on a CPU without native bf16) the linear maps of a bfloat16 forward
    of more than FLOAT32_MATMUL_ROWS tokens (a prefill) multiply float32 copies of their inputs and weights (bias
    included), their results rounded back to bfloat16; a few rows (eager decode steps) stay on the bfloat16 GEMM."""
    import torch.nn.functional as F

    import model as model_py

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    many = torch.randn(1, model_py.FLOAT32_MATMUL_ROWS + 1, 64, dtype=torch.bfloat16)
    few = many[:, :model_py.FLOAT32_MATMUL_ROWS]
    in_float32 = F.linear(many.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(model_py, "FLOAT32_MATMUL", True)
        assert torch.equal(model_py.linear(layer, many, None, "w"), in_float32)
        assert torch.equal(model_py.linear(layer, few, None, "w"), F.linear(few, layer.weight, layer.bias))
        assert torch.equal(model_py.linear_map(many, layer.weight), F.linear(many.float(), layer.weight.float()).bfloat16())

        config = ModelArgs(n_layer=2, n_head=4, dim=64, intermediate_size=128, vocab_size=100, block_size=64)
        tiny = Transformer(config).to(torch.bfloat16)
        tiny.setup_caches(1, 32)
        tokens, positions = torch.randint(0, 100, (1, 12)), torch.arange(12)
        mm_dtypes = []

        class SeeLinear(torch.overrides.TorchFunctionMode):  # the dtypes of every linear map's input
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is F.linear:
                    mm_dtypes.append(args[0].dtype)
                return func(*args, **(kwargs or {}))

        with SeeLinear():
            tiny(tokens, positions)
        assert set(mm_dtypes) == {torch.float32} and len(mm_dtypes) == 5 * 2 + 1  # (wqkv, wo, gate, up, down; output)
        monkeypatch.setattr(model_py, "FLOAT32_MATMUL", False)
        mm_dtypes.clear()
        with SeeLinear():
            tiny(tokens, positions)
        assert set(mm_dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("int8", [False, True])
def test_gate_and_up_maps_are_one_call(monkeypatch, rows, int8):
    """Compiled as the decoding steps are (bfloat16 on a CPU, a few rows), the feed-forward's gate and up maps, which
    read the same input, are one gemv over both weights for more than one row: the result of two calls bit for bit
    (each output's sum is the same sum), and where cpu_kernels' kernels are built, one kernel call fewer (int8: the
    draft's copies of its weights, whose rows that kernel rounds to 8 bits once instead of twice, and which it
    takes for one row too). One row of bfloat16 weights is unchanged."""
    import cpu_kernels
    import heads
    import model as model_py
    import s3d
    from torch._inductor.utils import run_and_get_code

    kernels = cpu_kernels.load()
    torch.manual_seed(rows)
    config = ModelArgs(dim=64, intermediate_size=96)
    feed_forward = model_py.FeedForward(config).to(torch.bfloat16).eval()
    adapters = None
    if int8:
        adapters = torch.nn.ModuleDict()
        for name in ("w1", "w3", "w2"):
            weight = getattr(feed_forward, name).weight
            adapters[name] = heads.LowRank(weight.shape[1], weight.shape[0], 2).to(torch.bfloat16)
            adapters[name].weight_int8, adapters[name].scale = heads.int8_per_channel(
                weight.float() + torch.randn(weight.shape) / 100)
    x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
    outputs, calls = {}, {}
    for fused in (False, True):
        monkeypatch.setattr(model_py, "FUSE_GATE_UP", fused)
        torch._dynamo.reset()
        step = s3d.compiled(lambda ff, x, adapters: ff(x, adapters), "cpu", False, False)
        with torch.no_grad():
            outputs[fused], code = run_and_get_code(step, feed_forward, x, adapters)
        calls[fused] = " ".join(code).count('"s3d_kernels::gemv_')
    assert torch.equal(outputs[True], outputs[False])
    kernel_calls = kernels and (model_py.DOT_INT8 if int8 else rows > 1 and model_py.DOT_BF16)
    assert calls[True] == calls[False] - (1 if kernel_calls else 0)
    with torch.no_grad():
        gate, up = (model_py.linear(getattr(feed_forward, n), x, adapters, n).float() for n in ("w1", "w3"))
        h = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
        expected = model_py.linear(feed_forward.w2, h, adapters, "w2").float()  # (eager: the library's maps)
    assert ((outputs[True].float() - expected).norm() / expected.norm()).item() < 2e-2
