"""The AVX512_BF16 kernel (cpu_kernels.py): the linear map of a few bfloat16 rows in float32 sums, each row's result
the same whatever rows come with it, called by compiled steps; and the machines and settings that leave it off.
The kernel's own tests need a CPU with AVX512_BF16 and a C++ compiler; elsewhere they are skipped."""
import pytest
import torch

import cpu_kernels
import model as model_py
import roofline


@pytest.fixture(scope="module")
def loaded():
    if not cpu_kernels.load():
        pytest.skip("needs a CPU with AVX512_BF16 (and the kernel built)")


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
    """A compiled bfloat16 linear map of 2 to GEMV_MAX_ROWS rows calls the kernel on the frozen weight in its pair
    layout; off (model.DOT_BF16 false) the same step has Inductor's reduction; one row, or one row more than
    GEMV_MAX_ROWS, does not call it either way."""
    import s3d
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16).eval()
    for rows in (1, model_py.GEMV_MAX_ROWS, model_py.GEMV_MAX_ROWS + 1):
        x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
        expected = x.float() @ layer.weight.float().T
        for on in (True, False):
            monkeypatch.setattr(model_py, "DOT_BF16", on)
            torch._dynamo.reset()
            step = s3d.compiled(lambda layer, x: model_py.linear(layer, x, None, "w"), "cpu", False, False)
            with torch.no_grad():
                y, code = run_and_get_code(step, layer, x)
            torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
            assert ("s3d_kernels" in " ".join(code)) == (on and 1 < rows <= model_py.GEMV_MAX_ROWS)
    assert roofline.kernel_kind("s3d_kernels::gemv_bf16", (512,)) == "linear maps"  # (bench.py --roofline's split)


def test_off_without_avx512_bf16_or_when_asked(monkeypatch):
    """load() builds nothing, reports False and leaves model.gemv as it is on a CPU without AVX512_BF16, or with
    S3D_DOT_BF16=0."""
    monkeypatch.setattr(model_py, "DOT_BF16", False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert cpu_kernels.load.__wrapped__() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("S3D_DOT_BF16", "0")
    assert cpu_kernels.load.__wrapped__() is False
    assert model_py.DOT_BF16 is False
