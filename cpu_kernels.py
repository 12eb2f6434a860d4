"""One hand-written CPU kernel, for what Inductor cannot emit: linear maps of a few bfloat16 rows with AVX512_BF16's
dot-product instruction.

A verify step multiplies every weight by g+1 rows. Inductor's few-row reduction (model.gemv) converts each bf16
weight to float32 and spends a multiply-add per row on it, so at 5 rows the cores' multiply-add rate, not the read
bandwidth, bounds it. `vdpbf16ps` multiplies 32 bf16 weights by a pair of bf16 inputs and adds the products into 16
float32 sums in one instruction, half the instructions per weight (BENCHMARKS.md, section 23, has what it saves).

The kernel is C++ built once per machine by torch's extension loader (cached; about half a minute the first time on
2 cores) and registered as the operator `s3d_kernels::gemv_bf16`, which compiled steps call like any other. Only
CPUs with AVX512_BF16 use it; elsewhere, where the build fails, or with S3D_DOT_BF16=0 in the environment (to
compare), model.gemv keeps Inductor's reductions.
"""
import functools
import logging
import os

import torch
from torch import Tensor

import model

log = logging.getLogger(__name__)

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

// y[r, 16b:16b+16] = sum over k of x[r, k] w[16b:16b+16, k], for R rows; w in blocks (n/16, k/2, 16, 2): one 64-byte
// load holds 16 output channels times 2 consecutive inputs, the operand vdpbf16ps takes
template <int R>
static void rows_block(int64_t pairs, const uint32_t* x, const uint16_t* w, float* y, int64_t n) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p++) {
    __m512bh wp = (__m512bh)_mm512_loadu_si512(w + p * 32);
    for (int r = 0; r < R; r++)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)x[r * pairs + p]), wp);
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * n, acc[r]);
}

static void rows_block_any(int rows, int64_t pairs, const uint32_t* x, const uint16_t* w, float* y, int64_t n) {
  switch (rows) {  // the row count a template argument, so that the sums stay in registers
    case 1: return rows_block<1>(pairs, x, w, y, n);
    case 2: return rows_block<2>(pairs, x, w, y, n);
    case 3: return rows_block<3>(pairs, x, w, y, n);
    case 4: return rows_block<4>(pairs, x, w, y, n);
    case 5: return rows_block<5>(pairs, x, w, y, n);
    case 6: return rows_block<6>(pairs, x, w, y, n);
    case 7: return rows_block<7>(pairs, x, w, y, n);
    default: return rows_block<8>(pairs, x, w, y, n);
  }
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16 takes bfloat16");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 16 && w.size(3) == 2 && w.is_contiguous(), "w must be (n/16, k/2, 16, 2)");
  const int64_t k = x.size(-1), n = w.size(0) * 16, pairs = w.size(1);
  TORCH_CHECK(pairs * 2 == k, "x has ", k, " inputs, w ", pairs * 2);
  at::Tensor rows = x.reshape({-1, k}).contiguous();
  const int64_t m = rows.size(0);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(rows.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n / 16, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++)
      for (int64_t r = 0; r < m; r += 8)
        rows_block_any((int)std::min<int64_t>(8, m - r), pairs, xp + r * pairs, wp + b * pairs * 32,
                       yp + r * n + b * 16, n);
  });
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  return y.view(sizes);
}

TORCH_LIBRARY(s3d_kernels, m) { m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(s3d_kernels, CPU, m) { m.impl("gemv_bf16", gemv_bf16); }
"""


ISA = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mprefer-vector-width=512"]


@functools.cache
def load() -> bool:
    """Builds (once per machine; torch caches the library) and registers gemv_bf16 on a CPU with AVX512_BF16.
    False where the CPU lacks it or the build fails (then the caller keeps Inductor's kernels)."""
    if not torch.cpu._is_avx512_bf16_supported() or os.environ.get("S3D_DOT_BF16") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load_inline

        try:  # the extension loader runs `ninja` from PATH: put the requirements' own in front of a system one
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass

        # (-fopenmp: without it at::parallel_for runs on one thread)
        load_inline("s3d_kernels", cpp_sources=[SOURCE], extra_cflags=["-O3", "-fopenmp", *ISA],
                    extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # a missing compiler, or one without AVX512_BF16: the Inductor path still works
        log.warning("s3d: AVX512_BF16 kernel not built (%s); few-row linear maps stay Inductor's", error)
        return False

    @torch.library.register_fake("s3d_kernels::gemv_bf16")
    def _(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0] * 16), dtype=torch.float32)

    model.DOT_BF16 = True  # model.gemv now calls it for 2 to GEMV_MAX_ROWS rows
    return True


def gemv_bf16(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., k) @ weight.T for bfloat16 x and weight (n, k): (..., n) float32 sums (eager; compiled steps call the
    operator on a frozen model.pair_blocks(weight))."""
    return torch.ops.s3d_kernels.gemv_bf16(x, model.pair_blocks(weight))
