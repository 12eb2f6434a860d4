"""The hand-written CPU kernels (cpu_kernels.py): the linear map of a few bfloat16 rows in float32 sums, and the
attention of a few queries over the cache, each row's result the same whatever rows come with it, both called by
compiled steps; and the machines and settings that leave them off. The kernels' own tests need a CPU with AVX2 (the
AVX-512 build where it has AVX512_BF16, the AVX2 build otherwise) and a C++ compiler; elsewhere they are skipped.
On an AVX-512 CPU the AVX2 build is tested too, in a process of its own."""
import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import cpu_kernels
import model as model_py
import roofline


@pytest.fixture(scope="module")
def loaded():
    if not (cpu_kernels.load() and cpu_kernels.build() == "avx512"):
        pytest.skip("needs a CPU with AVX512_BF16 (and the kernels built)")


@pytest.fixture(scope="module")
def attend_loaded():
    if not (cpu_kernels.load() and model_py.ATTEND):
        pytest.skip("needs a CPU with AVX2 (and the kernels built)")


@pytest.fixture(scope="module")
def int8_loaded():
    if not (cpu_kernels.load() and model_py.DOT_INT8):
        pytest.skip("needs a CPU with AVX2 or AVX512_VNNI (and the kernel built)")


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 21])
def test_gemv_bf16_is_the_linear_map_row_by_row(loaded, rows):
    torch.manual_seed(rows)
    x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
    weight = torch.randn(48, 96, dtype=torch.bfloat16)
    y = cpu_kernels.gemv_bf16(x, weight)
    expected = x.double() @ weight.double().T  # bf16 products are exact in float32: only the sums round
    assert y.shape == (1, rows, 48) and y.dtype == torch.float32
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-6
    alone = [cpu_kernels.gemv_bf16(x[:, i:i + 1], weight) for i in range(rows)]
    assert all(torch.equal(alone[i][0, 0], y[0, i]) for i in range(rows))


def test_compiled_steps_call_it_for_several_rows(loaded, monkeypatch):
    """A compiled bfloat16 linear map of 2 to DOT_BF16_MAX_ROWS rows (a small tree's verify too) calls the kernel on
    the frozen weight in its pair layout; off (model.DOT_BF16 false) the same step has Inductor's reduction up to
    GEMV_MAX_ROWS rows and the library's GEMM past them; one row, or one row more than DOT_BF16_MAX_ROWS, does not
    call it either way."""
    import s3d

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16).eval()
    assert model_py.GEMV_MAX_ROWS < model_py.DOT_BF16_MAX_ROWS
    for rows in (1, model_py.GEMV_MAX_ROWS, model_py.GEMV_MAX_ROWS + 1, model_py.DOT_BF16_MAX_ROWS,
                 model_py.DOT_BF16_MAX_ROWS + 1):
        x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
        expected = x.float() @ layer.weight.float().T
        for on in (True, False):
            monkeypatch.setattr(model_py, "DOT_BF16", on)
            torch._dynamo.reset()
            step = s3d.compiled(lambda layer, x: model_py.linear(layer, x, None, "w"), "cpu", False, False)
            with torch.no_grad():
                y, code = run_and_get_code(step, layer, x)
            torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
            assert ("s3d_kernels" in " ".join(code)) == (on and 1 < rows <= model_py.DOT_BF16_MAX_ROWS)
    assert roofline.kernel_kind("s3d_kernels::gemv_bf16", (512,)) == "linear maps"  # (bench.py --roofline's split)


@pytest.mark.parametrize("rows", [1, 4, 5, 8])
def test_gemv_int8_is_the_linear_map_of_rows_rounded_to_8_bits(int8_loaded, rows):
    """gemv_int8 rounds each row to 8 bits, each block of 32 inputs its largest magnitude to 127, and then sums
    exactly: it equals that rounding done here, times the int8 weights, to float32 precision; within 2 % of the
    unrounded product; where one input is 1000 times the rest, only its block's other 3 inputs are lost (one step per
    row would lose them all); a row's result does not depend on the rows beside it, nor on whether they come in
    bfloat16 or float32."""
    torch.manual_seed(rows)
    x = torch.randn(1, rows, 100, dtype=torch.bfloat16)  # (blocks of 32, 32, 32 and 4)
    weight = torch.randint(-128, 128, (48, 100), dtype=torch.int8)  # (-128 too)
    y = cpu_kernels.gemv_int8(x, weight)
    rounded = []
    for block in x.float().split(32, -1):
        step = block.abs().amax(-1, keepdim=True) / 127
        rounded.append(torch.round(block * (1 / step)).double() * step.double())
    expected = torch.cat(rounded, -1) @ weight.double().T
    assert y.shape == (1, rows, 48) and y.dtype == torch.float32
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-6
    exact = x.double() @ weight.double().T
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2
    outlier = x.clone()
    outlier[..., 99] = 1000  # (in the last block, of 4 inputs)
    error = cpu_kernels.gemv_int8(outlier, weight).double() - outlier.double() @ weight.double().T
    rest = x[..., :96].double() @ weight[:, :96].double().T
    assert (error.norm() / rest.norm()).item() < 0.35
    alone = [cpu_kernels.gemv_int8(x[:, i:i + 1], weight) for i in range(rows)]
    assert all(torch.equal(alone[i][0, 0], y[0, i]) for i in range(rows))
    assert torch.equal(cpu_kernels.gemv_int8(x.float(), weight), y)  # it reads float32 rows as well as bfloat16
    strided = torch.zeros(1, rows, 200, dtype=torch.bfloat16)
    strided[..., ::2] = x
    assert torch.equal(cpu_kernels.gemv_int8(strided[..., ::2], weight), y)  # and strided rows


def test_compiled_int8_maps_call_gemv_int8(int8_loaded, monkeypatch):
    """model.gemv of int8 weights (the draft's copies) calls gemv_int8 on the frozen weight in its quad layout where
    model.DOT_INT8 is on, and Inductor's reduction where it is off; both near the float product."""
    import heads
    import s3d

    torch.manual_seed(0)
    weight_int8, scale = heads.int8_per_channel(torch.randn(48, 64))
    x = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    expected = x.float() @ (weight_int8.float() * scale[:, None]).T
    for on in (True, False):
        monkeypatch.setattr(model_py, "DOT_INT8", on)
        torch._dynamo.reset()
        step = s3d.compiled(lambda x, w, scale: model_py.gemv(x, w, scale), "cpu", False, False)
        with torch.no_grad():
            y, code = run_and_get_code(step, x, weight_int8, scale.to(torch.bfloat16))
        assert ((y.float() - expected).norm() / expected.norm()).item() < 2e-2
        assert ("gemv_int8" in " ".join(code)) == on


def attention_inputs(batch, heads, kv_heads, head_dim, queries, keys, seed=0):
    """q laid out as the model's (a transposed view), k and v the first keys of a longer cache, a random mask in
    which every query sees the first key."""
    torch.manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, keys + 7, head_dim)[:, :, :keys] for _ in range(2))
    mask = torch.rand(batch, 1, queries, keys) < 0.6
    mask[..., 0] = True
    return q, k, v, mask


@pytest.mark.parametrize("shape", [(1, 9, 3, 64, 5, 37), (1, 9, 3, 64, 1, 512), (2, 8, 2, 128, 3, 100),
                                   (1, 4, 2, 16, 4, 16), (1, 6, 2, 96, 22, 61)])
def test_attend_is_attention_row_by_row(attend_loaded, shape):
    """attend equals the library's attention (GQA, a bool mask, batches with a mask each) computed in float64, and
    a query's row is the same bits whether it comes alone or with the others (the AR step and the verify step)."""
    q, k, v, mask = attention_inputs(*shape)
    y = cpu_kernels.attend(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    assert y.shape == q.shape and y.dtype == torch.float32
    assert (y.double() - expected).abs().max().item() < 1e-5
    for s in range(q.shape[2]):
        assert torch.equal(cpu_kernels.attend(q[:, :, s:s + 1], k, v, mask[:, :, s:s + 1])[:, :, 0], y[:, :, s])


def rounded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention in float64 with the probabilities (exp of the scores minus their maximum) rounded to bfloat16 and
    normalized by the sum of the rounded ones: what attend computes from a bfloat16 cache where head_dim is a
    multiple of 32."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, -float("inf"))
    e = (scores - scores.amax(-1, keepdim=True)).exp().float().bfloat16().double()
    return (e @ v) / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("shape", [(1, 9, 3, 64, 5, 37), (2, 8, 2, 128, 3, 100), (1, 6, 2, 96, 22, 61),
                                   (1, 4, 2, 48, 4, 30), (1, 9, 3, 64, 1, 512)])
def test_attend_on_a_bfloat16_cache(attend_loaded, shape):
    """k and v in bfloat16 (the first keys of a longer cache, as the model passes them). In the AVX-512 build, where
    head_dim is a multiple of 32, the scores and the weighted sum are on vdpbf16ps: the query and the probabilities
    are rounded to bfloat16, and the output is that attention computed in float64 (a probability whose float32 value
    lies at a bfloat16 rounding boundary may round the other way: a rare error of one rounding step, within the max
    below). Otherwise (and in the AVX2 build) the float32 query's attention, unrounded. A query's row is the same bits
    alone as with the others."""
    q, k, v, mask = attention_inputs(*shape)
    k, v = (torch.randn(*t.shape[:2], t.shape[2] + 7, t.shape[3]).bfloat16()[:, :, :t.shape[2]] for t in (k, v))
    y = cpu_kernels.attend(q, k, v, mask)
    assert y.shape == q.shape
    if q.shape[-1] % 32 == 0 and cpu_kernels.build() == "avx512":
        error = (y.double() - rounded_attention(q.bfloat16(), k, v, mask)).abs()
        unrounded = F.scaled_dot_product_attention(q.bfloat16().double(), k.double(), v.double(), attn_mask=mask,
                                                   enable_gqa=True)
        assert error.mean().item() < 1e-6 and error.max().item() < 2e-3
        assert (y.double() - unrounded).abs().mean().item() > 10 * error.mean().item()  # (the rounding is there)
    else:
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
        assert (y.double() - expected).abs().max().item() < 1e-5
    for s in range(q.shape[2]):
        assert torch.equal(cpu_kernels.attend(q[:, :, s:s + 1], k, v, mask[:, :, s:s + 1])[:, :, 0], y[:, :, s])


def test_a_bfloat16_cache_with_float32_attention(attend_loaded):
    """cli.load's choice where attend runs the decode steps: a bfloat16 model's keys and values (bfloat16 numbers)
    in a bfloat16 cache, attention in float32. The library's attention (an eager forward) gives exactly the logits
    it gives with a float32 cache; compiled steps of 1 and 5 tokens attend with the kernel, reading the bfloat16
    cache, and give the eager forward's logits."""
    import s3d

    torch.manual_seed(0)
    model = model_py.Transformer(model_py.ModelArgs(block_size=128, vocab_size=64, n_layer=2, n_head=4, n_local_heads=2,
                                                    dim=64, intermediate_size=96)).to(torch.bfloat16).eval()
    model.attention_dtype = torch.float32
    tokens = torch.randint(0, 64, (1, 20))
    logits = {}
    with torch.no_grad():
        for kv_dtype in (torch.float32, torch.bfloat16):
            model.kv_dtype = kv_dtype
            model.setup_caches(1, 128)
            assert model.layers[0].attention.kv_cache.k_cache.dtype == kv_dtype
            logits[kv_dtype] = model(tokens, torch.arange(20), mask=model.causal_mask[None, None, :20, :20])
        assert torch.equal(logits[torch.float32], logits[torch.bfloat16])
        step = s3d.compiled(lambda model, x, pos, mask: model(x, pos, mask=mask), "cpu", False, False)
        for rows in (1, 5):
            pos, mask = torch.arange(15, 15 + rows), model.causal_mask[None, None, 15:15 + rows, :15 + rows]
            y, code = run_and_get_code(step, model, tokens[:, 15:15 + rows], pos, mask)
            assert "s3d_kernels.attend" in " ".join(code)
            torch.testing.assert_close(y, logits[torch.bfloat16][:, 15:15 + rows], rtol=2e-2, atol=2e-2)
    assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16


def test_attend_reads_only_keys_some_query_sees(attend_loaded):
    """Keys after the last one any query sees (stale entries of the static cache) are never read: NaN there
    changes nothing. (A masked key before it may be read, and weighs exactly 0.)"""
    q, k, v, mask = attention_inputs(1, 9, 3, 64, 5, 40)
    mask[..., 30:] = False
    y = cpu_kernels.attend(q, k, v, mask)
    k[:, :, 30:], v[:, :, 30:] = float("nan"), float("nan")
    assert torch.equal(cpu_kernels.attend(q, k, v, mask), y)


def test_compiled_steps_attend_with_it(attend_loaded, monkeypatch):
    """A compiled forward of a few tokens on the CPU calls attend where model.ATTEND is on, and gives the eager
    forward's logits; a prefill longer than ATTEND_MAX_ROWS, or ATTEND off, keeps the library's attention."""
    import s3d

    torch.manual_seed(0)
    model = model_py.Transformer(model_py.ModelArgs(block_size=128, vocab_size=64, n_layer=2, n_head=4, n_local_heads=2,
                                                    dim=64, intermediate_size=96)).eval()
    model.setup_caches(1, 128)
    tokens = torch.randint(0, 64, (1, model_py.ATTEND_MAX_ROWS + 1))
    with torch.no_grad():
        model(tokens, torch.arange(tokens.shape[1]))  # a prompt in the cache, eager
        for rows in (1, 5, model_py.ATTEND_MAX_ROWS + 1):
            pos = torch.arange(10, 10 + rows)
            mask = model.causal_mask[None, None, 10:10 + rows, :10 + rows]
            expected = model(tokens[:, :rows], pos, mask=mask)
            for on in (True, False):
                monkeypatch.setattr(model_py, "ATTEND", on)
                torch._dynamo.reset()
                step = s3d.compiled(lambda model, x, pos, mask: model(x, pos, mask=mask), "cpu", False, False)
                logits, code = run_and_get_code(step, model, tokens[:, :rows], pos, mask)
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
                assert ("s3d_kernels.attend" in " ".join(code)) == (on and rows <= model_py.ATTEND_MAX_ROWS)
    assert roofline.kernel_kind("s3d_kernels::attend", (512,)) == "attention"  # (bench.py --roofline's split)


def test_off_without_avx2_or_when_asked(monkeypatch):
    """load() builds nothing, reports False and leaves model.gemv and the attention as they are on a CPU without
    AVX2, or with S3D_DOT_BF16=0; which build each CPU gets, and where decode steps attend with `attend`."""
    monkeypatch.setattr(model_py, "DOT_BF16", False)
    monkeypatch.setattr(model_py, "ATTEND", False)
    monkeypatch.setattr(model_py, "DOT_INT8", False)
    monkeypatch.delenv("S3D_ATTEND", raising=False)
    for capability, bf16, build in (("AVX512", True, "avx512"), ("AVX512", False, "avx2"), ("AVX2", True, "avx2"),
                                    ("DEFAULT", False, None)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
        assert cpu_kernels.build() == build
        assert cpu_kernels.may_attend() == (build is not None)  # (cli.load then keeps the KV cache in bfloat16)
    assert cpu_kernels.load.__wrapped__() is False  # (DEFAULT)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("S3D_DOT_BF16", "0")
    assert cpu_kernels.build() is None and cpu_kernels.load.__wrapped__() is False
    assert model_py.DOT_BF16 is False and model_py.ATTEND is False and model_py.DOT_INT8 is False


AVX2_BUILD = """
import sys
import torch
import torch.nn.functional as F
import cpu_kernels, model
assert cpu_kernels.build() == "avx2" and cpu_kernels.load()
assert model.DOT_INT8 and model.ATTEND and not model.DOT_BF16
torch.manual_seed(0)
x = torch.randn(8, 100, dtype=torch.bfloat16)
weight = torch.randint(-128, 128, (48, 100), dtype=torch.int8)
torch.save([cpu_kernels.gemv_int8(x[:rows], weight) for rows in (1, 3, 5, 8)] + [x, weight], sys.argv[1])
# attend: float32 and bfloat16 caches, unrounded float32 attention, each query row alone as with the others
for kv_dtype in (torch.float32, torch.bfloat16):
    for batch, heads, kv_heads, head_dim, queries, keys in ((1, 9, 3, 64, 5, 37), (2, 8, 2, 128, 3, 100),
                                                            (1, 6, 2, 96, 22, 61), (1, 4, 2, 16, 4, 5)):
        q = torch.randn(batch, queries, heads, head_dim).transpose(1, 2)
        k, v = (torch.randn(batch, kv_heads, keys + 7, head_dim).to(kv_dtype)[:, :, :keys] for _ in range(2))
        mask = torch.rand(batch, 1, queries, keys) < 0.6
        mask[..., 0] = True
        y = cpu_kernels.attend(q, k, v, mask)
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
        assert (y.double() - expected).abs().max().item() < 1e-5, (kv_dtype, head_dim)
        for s in range(queries):
            assert torch.equal(cpu_kernels.attend(q[:, :, s:s + 1], k, v, mask[:, :, s:s + 1])[:, :, 0], y[:, :, s])
"""


def test_the_avx2_build(int8_loaded, tmp_path):
    """The AVX2 build (ATEN_CPU_CAPABILITY=avx2: what a CPU with AVX2 alone builds) registers gemv_int8 and attend.
    Its gemv_int8's results for 1 to 8 rows (-128 weights and a short last block included) are this process's
    build's, bit for bit: on a CPU with AVX512_VNNI, the vpdpbusd kernel's. Its attend (in float32 throughout, from
    float32 and bfloat16 caches, head_dim 16 to 128) is checked in that process: near the float64 attention, each
    query row the same bits alone as with the others."""
    import os
    import subprocess
    import sys

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs a CPU with AVX2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", AVX2_BUILD, str(tmp_path / "y.pt")], env=env, check=True, cwd=root)
    *ys, x, weight = torch.load(tmp_path / "y.pt")
    for y, rows in zip(ys, (1, 3, 5, 8)):
        assert torch.equal(y, cpu_kernels.gemv_int8(x[:rows], weight)), rows
