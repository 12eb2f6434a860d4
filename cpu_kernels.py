"""Three hand-written CPU kernels, for what Inductor and the libraries do slowly in a decode step of a few tokens:
linear maps of a few bfloat16 rows on AVX512_BF16's dot products, int8 linear maps (the draft's, --quantize w8a8) on
AVX512_VNNI's, and attention of a few queries over the cache.

A verify step multiplies every weight by g+1 rows. Inductor's few-row reduction (model.gemv) converts each bf16
weight to float32 and spends a multiply-add per row on it, so at 5 rows the cores' multiply-add rate, not the read
bandwidth, bounds it. `vdpbf16ps` multiplies 32 bf16 weights by a pair of bf16 inputs and adds the products into 16
float32 sums in one instruction, half the instructions per weight (BENCHMARKS.md, section 23, has what it saves).

The S3D draft reads int8 copies of its layers (heads.DraftHeads.fold_adapters), which the reduction converts to
float32 before 4 multiply-adds, one per row. `vpdpbusd` multiplies 64 unsigned 8-bit weights (int8 plus 128) by 4
int8 inputs each into 16 int32 sums: with its rows rounded to 8 bits (a step per block of 32 inputs, as llama.cpp's
Q8_0 rounds them), which a draft may be (the full model checks every token it drafts), 4 rows cost an instruction
per 64 weights each (section 24), and a conversion and a multiply-add per 32 (section 37). A target quantized with
--quantize w8a8 (checkpoint.quantize_w8a8) is int8 weights times rows rounded to 8 bits by definition: its decode
steps, the 1-row AR step included, run on this kernel too, and its exact whole-number sums make each verify row the
AR step's (section 36).

Attention of 1 to 5 queries over a few hundred cached keys is a few million multiply-adds a layer, yet the
library's CPU attention took 70 to 170 us a layer for it: it is built for long queries, and it reads the whole
masked width. `attend` reads only the keys the mask lets some query see, reads each key once for up to 4 query rows
of its KV head, and computes every row alone, so a verify row attends exactly as the AR step's row does (section 24).
It reads a bfloat16 cache as well as a float32 one (section 26). From a bfloat16 cache both products are on
`vdpbf16ps`: the scores with the query rounded to bfloat16 (as the model's query is), 16 keys' sums at a time, and the
weighted sum of the values two keys at a time, the probabilities rounded to bfloat16 (as the library's bfloat16
attention rounds them; section 33). CPUs with AVX2 alone get a build of `attend` in float32 throughout, 8 lanes a
register, the bfloat16 cache converted as it is read, once for up to 8 query rows (sections 42 and 45).

The kernels are C++ built once per machine by torch's extension loader (cached; about half a minute the first time
on 2 cores) and registered as the operators `s3d_kernels::gemv_bf16`, `s3d_kernels::gemv_int8` and
`s3d_kernels::attend`, which compiled steps call like any other. CPUs with AVX512_BF16 use all three (and with
AVX512_VNNI, gemv_int8); CPUs with AVX2 alone get attend and a build of gemv_int8 on `vpmaddubsw` (32 products of
bytes an instruction, in pairs; the same whole-number sums, so the same results bit for bit), for the int8 draft and
w8a8. Their bfloat16 maps of a few rows stay Inductor's reductions: an AVX2 gemv_bf16 (two multiply-adds a pair of
weights and row) was slower than those at 5 rows (section 42). Elsewhere, where the build fails, or with
S3D_DOT_BF16=0 in the environment, model.py keeps Inductor's reductions and the library's attention. S3D_DOT_INT8=0
or S3D_ATTEND=0 leaves out one kernel alone (to compare).
"""
import functools
import logging
import os
from typing import Optional

import torch
from torch import Tensor

import model

log = logging.getLogger(__name__)

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// Both gemv kernels read their rows interleaved: in each group of up to 8 rows (one pass over the weights), the rows'
// 4-byte inputs for one weight load side by side, so that the inputs are one stream of reads beside the weights'
// (one stream per row slowed 5 rows from memory by a third: BENCHMARKS.md, section 25). Into a buffer kept per
// thread and call after call: a new one each call cost an allocation and a zero fill (1 % of a verify step, section 29)
static const uint32_t* interleave_rows(const uint32_t* rows, int64_t m, int64_t width) {
  static thread_local std::vector<uint32_t> out;
  if ((int64_t)out.size() < m * width) out.resize(m * width);
  for (int64_t r0 = 0; r0 < m; r0 += 8) {
    const int64_t g = std::min<int64_t>(8, m - r0);
    for (int64_t p = 0; p < width; p++)
      for (int64_t r = 0; r < g; r++) out[r0 * width + p * g + r] = rows[(r0 + r) * width + p];
  }
  return out.data();
}

// the float32 sums of x's rows by n outputs, in x's shape (no reshape: each op through the dispatcher costs)
static at::Tensor empty_sums(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  return at::empty(sizes, x.options().dtype(at::kFloat));
}

#ifdef __AVX512BF16__  // (the AVX2 build has gemv_int8 and attend)
// y[r, 16b:16b+16] = sum over k of x[r, k] w[16b:16b+16, k], for R rows; w in blocks (n/16, k/2, 16, 2): one 64-byte
// load holds 16 output channels times 2 consecutive inputs, the operand vdpbf16ps takes
template <int R>
static void rows_block(int64_t pairs, const uint32_t* x, const uint16_t* w, float* y, int64_t n) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p++) {
    __m512bh wp = (__m512bh)_mm512_loadu_si512(w + p * 32);
    for (int r = 0; r < R; r++)  // (x interleaved: interleave_rows)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)x[p * R + r]), wp);
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
  const int64_t k = x.size(-1), n = w.size(0) * 16, pairs = w.size(1), m = x.numel() / k;
  TORCH_CHECK(pairs * 2 == k, "x has ", k, " inputs, w ", pairs * 2);
  const at::Tensor rows = x.is_contiguous() ? x : x.contiguous();
  at::Tensor y = empty_sums(x, n);
  const uint32_t* xi = interleave_rows(reinterpret_cast<const uint32_t*>(rows.data_ptr()), m, pairs);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n / 16, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++)
      for (int64_t r = 0; r < m; r += 8)
        rows_block_any((int)std::min<int64_t>(8, m - r), pairs, xi + r * pairs, wp + b * pairs * 32,
                       yp + r * n + b * 16, n);
  });
  return y;
}

#endif

// int8 weights (the S3D draft's copies, --quantize w8a8) on AVX512_VNNI's vpdpbusd, which multiplies 64 u8 weights
// by 4 int8 inputs each and adds into 16 int32 sums. Each row is rounded to 8 bits first, one step per block of 32
// inputs (x ~ q s, s = the block's max |x| / 127, q whole numbers from -127 to 127), as llama.cpp's Q8_0 rounds
// them: one step per row lost 4 % perplexity to the few inputs far larger than the rest (BENCHMARKS.md, section 37).
// The weights in blocks (n/16, k/4, 16, 4): one 64-byte load holds 16 output channels times 4 consecutive inputs,
// made unsigned by adding 128 (flipping the top bit). A block's whole-number sum starts at -128 times its sum of q,
// which takes the offset off again, so it is exact; then it is scaled by s and added, block after block, in float32.
// quads (4 inputs) in a block: INT8_BLOCK is model.INT8_BLOCK (32), given by load() so that both round alike
static constexpr int64_t BLOCK_QUADS = INT8_BLOCK / 4;
static_assert(INT8_BLOCK % 4 == 0 && INT8_BLOCK <= 32, "a block is whole quads, read in at most two 16-input loads");

#ifdef __AVX512VNNI__
template <int R>
static void quads_block(int64_t quads, const int32_t* x, const int8_t* w, const float* step,
                        const int32_t* offset, float* y, int64_t n) {
  __m512 acc[R];
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t p0 = 0, b = 0; p0 < quads; p0 += BLOCK_QUADS, b++) {
    __m512i sum[R];
    for (int r = 0; r < R; r++) sum[r] = _mm512_set1_epi32(offset[b * R + r]);
    const int64_t p1 = std::min(quads, p0 + BLOCK_QUADS);
    for (int64_t p = p0; p < p1; p++) {
      const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(w + p * 64), flip);  // w + 128, as unsigned
      for (int r = 0; r < R; r++) sum[r] = _mm512_dpbusd_epi32(sum[r], wu, _mm512_set1_epi32(x[p * R + r]));
    }
    for (int r = 0; r < R; r++)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(step[b * R + r]), acc[r]);
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * n, acc[r]);
}
#else
// AVX2 has no vpdpbusd: vpmaddubsw multiplies 32 u8 by 32 int8 into 16 int16 sums of pairs, which would overflow
// for u8 weights plus 128. So each product is |w| (as u8: 128 for -128 too) times q with w's sign (vpsignb; as
// |q| <= 127, a pair's sum stays within int16), and vpmaddwd adds the pairs into one int32 per output and quad: the
// block's whole-number sum, the same as vpdpbusd's after its offset, so both builds give the same float32 sums bit
// for bit. A 64-byte load's two halves (outputs 0-7 and 8-15) in turn, the block's weights in L1 for the second.
template <int R>
static void quads_block(int64_t quads, const int32_t* x, const int8_t* w, const float* step,
                        const int32_t* /*offset*/, float* y, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; h++) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t p0 = 0, b = 0; p0 < quads; p0 += BLOCK_QUADS, b++) {
      __m256i sum[R];
      for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
      const int64_t p1 = std::min(quads, p0 + BLOCK_QUADS);
      for (int64_t p = p0; p < p1; p++) {
        const __m256i wq = _mm256_loadu_si256((const __m256i*)(w + p * 64 + h * 32)), wabs = _mm256_abs_epi8(wq);
        for (int r = 0; r < R; r++) {
          const __m256i q = _mm256_set1_epi32(x[p * R + r]);
          const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(q, wq));
          sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs, ones));
        }
      }
      for (int r = 0; r < R; r++)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(step[b * R + r]), acc[r]);
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * n + h * 8, acc[r]);
  }
}
#endif

static void quads_block_any(int rows, int64_t quads, const int32_t* x, const int8_t* w, const float* step,
                            const int32_t* offset, float* y, int64_t n) {
  switch (rows) {  // the row count a template argument, so that the sums stay in registers
    case 1: return quads_block<1>(quads, x, w, step, offset, y, n);
    case 2: return quads_block<2>(quads, x, w, step, offset, y, n);
    case 3: return quads_block<3>(quads, x, w, step, offset, y, n);
    case 4: return quads_block<4>(quads, x, w, step, offset, y, n);
    case 5: return quads_block<5>(quads, x, w, step, offset, y, n);
    case 6: return quads_block<6>(quads, x, w, step, offset, y, n);
    case 7: return quads_block<7>(quads, x, w, step, offset, y, n);
    default: return quads_block<8>(quads, x, w, step, offset, y, n);
  }
}

#ifdef __AVX512F__
// 16 inputs from float32 or bfloat16 (the upper half of a float32), as float32; lanes outside `in` are 0
static inline __m512 load_inputs(const void* row, bool bf16, int64_t i, __mmask16 in) {
  if (!bf16) return _mm512_maskz_loadu_ps(in, (const float*)row + i);
  const __m512i half = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, (const uint16_t*)row + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(half, 16));
}
#else
// one input from float32 or bfloat16 (the upper half of a float32), as float32
static inline float load_input(const void* row, bool bf16, int64_t i) {
  if (!bf16) return ((const float*)row)[i];
  uint32_t bits = (uint32_t)((const uint16_t*)row)[i] << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
#endif

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.size(2) == 16 && w.size(3) == 4 && w.is_contiguous(),
              "w must be int8 (n/16, k/4, 16, 4)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "gemv_int8 takes float32 or bfloat16 x");
  const int64_t k = x.size(-1), n = w.size(0) * 16, quads = w.size(1), m = x.numel() / k;
  TORCH_CHECK(quads * 4 == k, "x has ", k, " inputs, w ", quads * 4);
  TORCH_CHECK(m <= 8, "gemv_int8 takes up to 8 rows");
  // (read as they come, without a copy to float32 first: each op through the dispatcher costs)
  const at::Tensor rows = x.is_contiguous() ? x : x.contiguous();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const char* xp = static_cast<const char*>(rows.data_ptr());
  const int64_t blocks = (quads + BLOCK_QUADS - 1) / BLOCK_QUADS;
  std::vector<int8_t> xq(m * k);  // the rows rounded to 8 bits
  std::vector<float> step(blocks * m);  // per block, the rows side by side (as interleave_rows lays out the inputs)
  std::vector<int32_t> offset(blocks * m);
  for (int64_t r = 0; r < m; r++) {
    const void* row = xp + r * k * rows.element_size();
#ifdef __AVX512F__
    for (int64_t b = 0; b < blocks; b++) {  // (k is a multiple of 4; the inputs past k through masked loads)
      const int64_t i0 = b * BLOCK_QUADS * 4, i1 = std::min(k, i0 + BLOCK_QUADS * 4);
      __mmask16 in[2];
      __m512 top = _mm512_setzero_ps();
      for (int h = 0; h < 2; h++) {
        const int64_t left = i1 - i0 - 16 * h;
        in[h] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
        top = _mm512_max_ps(top, _mm512_abs_ps(load_inputs(row, bf16, i0 + 16 * h, in[h])));
      }
      const float largest = _mm512_reduce_max_ps(top), s = largest > 0 ? largest / 127 : 1.0f;
      const __m512 inv = _mm512_set1_ps(1 / s);
      __m512i total = _mm512_setzero_si512();
      for (int h = 0; h < 2; h++) {  // round to nearest: -127 to 127
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_inputs(row, bf16, i0 + 16 * h, in[h]), inv));
        total = _mm512_add_epi32(total, q);
        _mm_mask_storeu_epi8(xq.data() + r * k + i0 + 16 * h, in[h], _mm512_cvtepi32_epi8(q));
      }
      step[b * m + r] = s;
      offset[b * m + r] = -128 * _mm512_reduce_add_epi32(total);
    }
#else
    for (int64_t b = 0; b < blocks; b++) {  // the same numbers one at a time: the same steps and roundings
      const int64_t i0 = b * BLOCK_QUADS * 4, i1 = std::min(k, i0 + BLOCK_QUADS * 4);
      float largest = 0;
      for (int64_t i = i0; i < i1; i++) largest = std::max(largest, std::fabs(load_input(row, bf16, i)));
      const float s = largest > 0 ? largest / 127 : 1.0f, inv = 1 / s;
      int32_t total = 0;
      for (int64_t i = i0; i < i1; i++) {
        const int32_t q = (int32_t)std::nearbyint(load_input(row, bf16, i) * inv);  // to nearest, ties to even
        total += q;
        xq[r * k + i] = (int8_t)q;
      }
      step[b * m + r] = s;
      offset[b * m + r] = -128 * total;
    }
#endif
  }
  at::Tensor y = empty_sums(x, n);
  const int32_t* xq4 =
      reinterpret_cast<const int32_t*>(interleave_rows(reinterpret_cast<const uint32_t*>(xq.data()), m, quads));
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n / 16, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++)
      quads_block_any((int)m, quads, xq4, wp + b * quads * 64, step.data(), offset.data(), yp + b * 16, n);
  });
  return y;
}

// Attention of a few queries over the cache, for decode steps: per query row, its scores over the live keys, a
// softmax and the weighted sum of the values, in float32. Every row is computed alone, in the same order whatever
// rows come with it, so a verify row attends exactly as the AR step's one row does. The cache may be bfloat16 (half
// the bytes to read; its keys and values come from bfloat16 maps, so that float32 would hold the same numbers):
// then (head_dim a multiple of 32) the scores are dot products of bfloat16 pairs, the query rounded to bfloat16 as
// the model's is, and so is the weighted sum of the values, the probabilities rounded to bfloat16: half the
// instructions of float32's.

template <typename KV>
struct AttendArgs {
  const float* q;
  const KV *k, *v;
  const bool* mask;
  float* out;
  int64_t S, G, T, padded;  // queries, query heads per KV head, keys; T rounded up to 16 (a row of scores)
  int64_t qb, qh, qs, kb, kh, kt, vb, vh, vt, mb, ms, ob, oh, os;  // strides
};

#ifdef __AVX512BF16__
static constexpr int ATTEND_ROWS = 4;  // query rows a pass over the keys serves: their sums stay in registers
static constexpr int ATTEND_ITEMS = 2;  // work items per thread at least, where a KV head's rows split that far
static constexpr int64_t ATTEND_BLOCKS = 0;  // floats of scratch after the rows' scores: none here

static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const at::BFloat16* p) {  // 16 bfloat16 as float32: the same bits, 16 places higher
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// exp(x) for x <= 0 (scores minus their maximum): Cephes' expf polynomial; lanes outside `keep` are 0
static inline __m512 exp_nonpositive(__m512 x, __mmask16 keep) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln 2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));  // times 2^n
}

// the sums of 16 vectors' lanes, a[i]'s in lane i: a tree of 45 shuffles and adds
static inline __m512 sum16(const __m512 a[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; i++)  // per 128-bit lane: lanes 0+2 of a[2i], of a[2i+1], then lanes 1+3 of each
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per 128-bit lane: the sums of its 4 floats of a[4i] .. a[4i+3]
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; i++)  // 128-bit lanes 0+1 and 2+3, of c[2i] then of c[2i+1]
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}

// R query rows (row = g * S + s: query head kvh * G + g, query s) of KV head kvh; head_dim = 16 * DV
template <int R, int DV, typename KV>
static void attend_rows(const AttendArgs<KV>& a, int64_t b, int64_t kvh, int64_t row0, float* scores) {
  const float inf = std::numeric_limits<float>::infinity();
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(16.0f * DV));
  const float* query[R];
  const bool* mask[R];
  int64_t keys = 0;  // the keys any of the rows sees: the rest of the cache is never read
  for (int r = 0; r < R; r++) {
    const int64_t g = (row0 + r) / a.S, s = (row0 + r) % a.S;
    query[r] = a.q + b * a.qb + (kvh * a.G + g) * a.qh + s * a.qs;
    mask[r] = a.mask + b * a.mb + s * a.ms;
    int64_t last = a.T;
    while (last > 0 && !mask[r][last - 1]) last--;
    keys = std::max(keys, last);
  }
  const KV* kp = a.k + b * a.kb + kvh * a.kh;
  if constexpr (std::is_same_v<KV, at::BFloat16> && DV % 2 == 0) {
    // bfloat16 keys: the query rounded to bfloat16 too (as the model's is), 32 products a vdpbf16ps, and the
    // scores of 16 keys summed at once (the keys of a KV head stay in cache for the next row)
    for (int r = 0; r < R; r++) {
      __m512bh qh[DV / 2];
      for (int d = 0; d < DV / 2; d++)  // (the second operand fills lanes 0-15)
        qh[d] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(query[r] + 32 * d + 16), _mm512_loadu_ps(query[r] + 32 * d));
      for (int64_t t0 = 0; t0 < keys; t0 += 16) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {  // (past the last key: its copies, masked below)
          const at::BFloat16* key = kp + std::min(t0 + j, keys - 1) * a.kt;
          acc[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qh[0], (__m512bh)_mm512_loadu_si512(key));
          for (int d = 1; d < DV / 2; d++)
            acc[j] = _mm512_dpbf16_ps(acc[j], qh[d], (__m512bh)_mm512_loadu_si512(key + 32 * d));
        }
        _mm512_storeu_ps(scores + r * a.padded + t0, _mm512_mul_ps(sum16(acc), scale));
      }
    }
  } else {
    __m512 q[R][DV];
    for (int r = 0; r < R; r++)
      for (int d = 0; d < DV; d++) q[r][d] = _mm512_mul_ps(_mm512_loadu_ps(query[r] + 16 * d), scale);
    for (int64_t t = 0; t < keys; t++) {  // scores: each key read once for the R rows
      __m512 kt[DV];
      for (int d = 0; d < DV; d++) kt[d] = load16(kp + t * a.kt + 16 * d);
      for (int r = 0; r < R; r++) {
        __m512 acc = _mm512_mul_ps(q[r][0], kt[0]);
        for (int d = 1; d < DV; d++) acc = _mm512_fmadd_ps(q[r][d], kt[d], acc);
        scores[r * a.padded + t] = _mm512_reduce_add_ps(acc);
      }
    }
  }
  // bfloat16 values: the probabilities rounded to bfloat16 too (as the library's bfloat16 attention rounds them), so
  // that the weighted sum takes two keys a vdpbf16ps, where float32 takes a multiply-add per key (section 33)
  constexpr bool bf16_values = std::is_same_v<KV, at::BFloat16> && DV % 2 == 0;
  float inv_sum[R];
  for (int r = 0; r < R; r++) {  // softmax over the keys the mask lets row r see, 16 at a time
    float* sc = scores + r * a.padded;
    __m512 top = _mm512_set1_ps(-inf);
    for (int64_t t = 0; t < keys; t += 16) {
      __mmask16 live = keys - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (keys - t)) - 1);
      live = _mm_test_epi8_mask(_mm_maskz_loadu_epi8(live, mask[r] + t), _mm_set1_epi8(1));
      __m512 x = _mm512_mask_blend_ps(live, _mm512_set1_ps(-inf), _mm512_loadu_ps(sc + t));
      _mm512_storeu_ps(sc + t, x);
      top = _mm512_max_ps(top, x);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < keys; t += 16) {
      __m512 x = _mm512_loadu_ps(sc + t);
      __m512 e = exp_nonpositive(_mm512_sub_ps(x, m), _mm512_cmp_ps_mask(x, _mm512_set1_ps(-inf), _CMP_NEQ_OQ));
      if constexpr (bf16_values) {  // the rounded probabilities (in place: the row's first half, already read)
        const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(e);
        _mm256_storeu_si256((__m256i*)(reinterpret_cast<uint16_t*>(sc) + t), rounded);
        e = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16));
      } else {
        _mm512_storeu_ps(sc + t, e);
      }
      sum = _mm512_add_ps(sum, e);
    }
    inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  __m512 o[R][DV];
  for (int r = 0; r < R; r++)
    for (int d = 0; d < DV; d++) o[r][d] = _mm512_setzero_ps();
  const KV* vp = a.v + b * a.vb + kvh * a.vh;
  if constexpr (bf16_values) {
    // Keys t and t+1 at once: their values interleaved, 16 dims' pairs a register (the dims of each 128-bit lane in
    // two halves: o[r][2d] gets dims 8L..8L+3 of lane L of the 32 dims 32d.., o[r][2d+1] dims 8L+4..8L+7), times the
    // pair of probabilities (0 past the last key, whose copy fills in for key t+1)
    for (int64_t t = 0; t < keys; t += 2) {
      const KV *v0 = vp + t * a.vt, *v1 = vp + std::min(t + 1, keys - 1) * a.vt;
      __m512bh pairs[DV];
      for (int d = 0; d < DV / 2; d++) {
        const __m512i x0 = _mm512_loadu_si512(v0 + 32 * d), x1 = _mm512_loadu_si512(v1 + 32 * d);
        pairs[2 * d] = (__m512bh)_mm512_unpacklo_epi16(x0, x1);
        pairs[2 * d + 1] = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
      }
      for (int r = 0; r < R; r++) {
        int32_t p;
        std::memcpy(&p, reinterpret_cast<const uint16_t*>(scores + r * a.padded) + t, 4);
        for (int d = 0; d < DV; d++) o[r][d] = _mm512_dpbf16_ps(o[r][d], pairs[d], (__m512bh)_mm512_set1_epi32(p));
      }
    }
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int r = 0; r < R; r++)  // the dims back in order
      for (int d = 0; d < DV; d += 2) {
        const __m512 lo = o[r][d], hi = o[r][d + 1];
        o[r][d] = _mm512_permutex2var_ps(lo, first, hi);
        o[r][d + 1] = _mm512_permutex2var_ps(lo, second, hi);
      }
  } else {
    for (int64_t t = 0; t < keys; t++) {  // the values weighted by the probabilities (0 where masked)
      __m512 vt[DV];
      for (int d = 0; d < DV; d++) vt[d] = load16(vp + t * a.vt + 16 * d);
      for (int r = 0; r < R; r++) {
        __m512 p = _mm512_set1_ps(scores[r * a.padded + t]);
        for (int d = 0; d < DV; d++) o[r][d] = _mm512_fmadd_ps(p, vt[d], o[r][d]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    const int64_t g = (row0 + r) / a.S, s = (row0 + r) % a.S;
    float* op = a.out + b * a.ob + (kvh * a.G + g) * a.oh + s * a.os;
    for (int d = 0; d < DV; d++) _mm512_storeu_ps(op + 16 * d, _mm512_mul_ps(o[r][d], _mm512_set1_ps(inv_sum[r])));
  }
}
#else
// AVX2 (no bfloat16 arithmetic): everything in float32, a bfloat16 cache's keys and values converted exactly (the
// same bits, 16 places higher) as they are read. The keys of 8 positions and then their values are converted into a
// float32 block, once for up to 8 rows (a float32 cache's are read in place); each row's scores (8 keys' sums at
// once, 8 chains of multiply-adds in flight, the query in registers) and weighted sum then read the block from L1.
// Every row alone, in the same order whatever rows come with it, as in the AVX-512 build, so a verify row attends
// exactly as the AR step's row does here too. (BENCHMARKS.md, section 45: verify(5)'s attention 2.3 times cheaper
// than with 4 rows a block, 4 chains and a copy of a float32 cache.)

// query rows a pass over the keys serves: each key converted once for up to 8 (their sums are kept in memory, not
// in registers, so the number of rows is a run-time one here)
static constexpr int ATTEND_ROWS = 8;
// one work item per thread is enough: a KV head's rows in two items would read its keys twice, converted twice
static constexpr int ATTEND_ITEMS = 1;
// floats of scratch after the rows' scores (attend_rows): the block of 8 keys or values, 8 scaled queries, 8 sums
static constexpr int64_t ATTEND_BLOCKS = 24 * 128;

static inline void load8_into(const float* p, float* out) { _mm256_storeu_ps(out, _mm256_loadu_ps(p)); }
static inline void load8_into(const at::BFloat16* p, float* out) {
  const __m256i half = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  _mm256_storeu_ps(out, _mm256_castsi256_ps(_mm256_slli_epi32(half, 16)));
}

// exp(x) for x <= 0 (scores minus their maximum): the AVX-512 build's polynomial, 2^n made from its exponent bits;
// lanes outside `keep` (all bits set: kept) are 0
static inline __m256 exp_nonpositive(__m256 x, __m256 keep) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln 2, in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), keep);
}

// the sums of 4 vectors' lanes per 128-bit half: a[i]'s in lanes i (low half) and 4 + i (high half)
static inline __m256 sum4(const __m256 a[4]) {
  return _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
}

// positions t0 .. t0 + 7 of a cache (keys or values), as 8 float32 rows `step` floats apart: in place where the
// cache is float32 and all 8 are live, else converted (bfloat16) or copied into the block (past the last key: its
// copies), once for the R rows
template <int D, typename KV>
static inline const float* block8(const KV* p, int64_t stride, int64_t t0, int64_t keys, float* block, int64_t& step) {
  if constexpr (std::is_same_v<KV, float>) {
    if (t0 + 8 <= keys) {
      step = stride;
      return p + t0 * stride;
    }
  }
  for (int j = 0; j < 8; j++)
    for (int d = 0; d < D; d += 8) load8_into(p + std::min(t0 + j, keys - 1) * stride + d, block + j * D + d);
  step = D;
  return block;
}

static inline float reduce(__m256 x, bool max) {
  __m128 h = max ? _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1))
                 : _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  h = max ? _mm_max_ps(h, _mm_movehl_ps(h, h)) : _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = max ? _mm_max_ss(h, _mm_movehdup_ps(h)) : _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// R query rows (row = g * S + s: query head kvh * G + g, query s) of KV head kvh; head_dim = 16 * DV. `scratch`:
// the rows' scores (R times a.padded), then the block of 8 keys or values, the scaled queries and the weighted sums
template <int DV, typename KV>
static void attend_rows(int R, const AttendArgs<KV>& a, int64_t b, int64_t kvh, int64_t row0, float* scratch) {
  constexpr int D = 16 * DV, V = 2 * DV;  // V: 8-float vectors in a head (even), taken W at a time below
  constexpr int W = V % 8 == 0 ? 8 : V % 4 == 0 ? 4 : 2;
  const float inf = std::numeric_limits<float>::infinity();
  float *scores = scratch, *block = scratch + R * a.padded, *q = block + 8 * D, *o = q + R * D;
  const bool* mask[ATTEND_ROWS];
  int64_t keys = 0;  // the keys any of the rows sees: the rest of the cache is never read
  const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt((float)D));
  for (int r = 0; r < R; r++) {
    const int64_t g = (row0 + r) / a.S, s = (row0 + r) % a.S;
    const float* query = a.q + b * a.qb + (kvh * a.G + g) * a.qh + s * a.qs;
    for (int d = 0; d < V; d++)
      _mm256_storeu_ps(q + r * D + 8 * d, _mm256_mul_ps(_mm256_loadu_ps(query + 8 * d), scale));
    mask[r] = a.mask + b * a.mb + s * a.ms;
    int64_t last = a.T;
    while (last > 0 && !mask[r][last - 1]) last--;
    keys = std::max(keys, last);
  }
  const KV* kp = a.k + b * a.kb + kvh * a.kh;
  for (int64_t t0 = 0; t0 < keys; t0 += 8) {  // scores: 8 keys' sums at a time, the query in registers
    int64_t step;
    const float* key = block8<D>(kp, a.kt, t0, keys, block, step);
    for (int r = 0; r < R; r++) {
      __m256 qv[V], acc[8];  // 8 keys' multiply-adds in flight: 8 independent chains
      for (int d = 0; d < V; d++) qv[d] = _mm256_loadu_ps(q + r * D + 8 * d);
      for (int j = 0; j < 8; j++) acc[j] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(key + j * step));
      for (int d = 1; d < V; d++)
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv[d], _mm256_loadu_ps(key + j * step + 8 * d), acc[j]);
      const __m256 low = sum4(acc), high = sum4(acc + 4);
      _mm256_storeu_ps(scores + r * a.padded + t0, _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                                                                 _mm256_permute2f128_ps(low, high, 0x31)));
    }
  }
  float inv_sum[ATTEND_ROWS];
  for (int r = 0; r < R; r++) {  // softmax over the keys the mask lets row r see, 8 at a time
    float* sc = scores + r * a.padded;
    __m256 top = _mm256_set1_ps(-inf);
    for (int64_t t = 0; t < keys; t += 8) {
      uint64_t bytes = 0;  // the mask's 8 entries (past T: none; past `keys` the mask hides every key already)
      if (t + 8 <= a.T)
        std::memcpy(&bytes, mask[r] + t, 8);
      else
        for (int64_t j = t; j < a.T; j++) bytes |= (uint64_t)mask[r][j] << (8 * (j - t));
      const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
          _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes)), _mm256_setzero_si256()));
      const __m256 x = _mm256_blendv_ps(_mm256_set1_ps(-inf), _mm256_loadu_ps(sc + t), live);
      _mm256_storeu_ps(sc + t, x);
      top = _mm256_max_ps(top, x);
    }
    const __m256 m = _mm256_set1_ps(reduce(top, true));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < keys; t += 8) {
      const __m256 x = _mm256_loadu_ps(sc + t);
      const __m256 e = exp_nonpositive(_mm256_sub_ps(x, m), _mm256_cmp_ps(x, _mm256_set1_ps(-inf), _CMP_NEQ_OQ));
      _mm256_storeu_ps(sc + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    inv_sum[r] = 1.0f / reduce(sum, false);
  }
  std::memset(o, 0, sizeof(float) * R * D);
  const KV* vp = a.v + b * a.vb + kvh * a.vh;
  for (int64_t t0 = 0; t0 < keys; t0 += 8) {  // the values weighted by the probabilities (0 where masked)
    int64_t step;
    const float* value = block8<D>(vp, a.vt, t0, keys, block, step);
    for (int r = 0; r < R; r++)
      for (int d0 = 0; d0 < V; d0 += W) {  // W of the row's sums in registers, key after key
        __m256 acc[W];
        for (int d = 0; d < W; d++) acc[d] = _mm256_loadu_ps(o + r * D + 8 * (d0 + d));
        for (int j = 0; j < 8; j++) {
          const __m256 p = _mm256_set1_ps(scores[r * a.padded + t0 + j]);
          for (int d = 0; d < W; d++)
            acc[d] = _mm256_fmadd_ps(p, _mm256_loadu_ps(value + j * step + 8 * (d0 + d)), acc[d]);
        }
        for (int d = 0; d < W; d++) _mm256_storeu_ps(o + r * D + 8 * (d0 + d), acc[d]);
      }
  }
  for (int r = 0; r < R; r++) {
    const int64_t g = (row0 + r) / a.S, s = (row0 + r) % a.S;
    float* op = a.out + b * a.ob + (kvh * a.G + g) * a.oh + s * a.os;
    for (int d = 0; d < V; d++)
      _mm256_storeu_ps(op + 8 * d, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + 8 * d), _mm256_set1_ps(inv_sum[r])));
  }
}
#endif

template <int DV, typename KV>
static void attend_any(int rows, const AttendArgs<KV>& a, int64_t b, int64_t kvh, int64_t row0, float* scores) {
#ifdef __AVX512BF16__
  switch (rows) {
    case 1: return attend_rows<1, DV>(a, b, kvh, row0, scores);
    case 2: return attend_rows<2, DV>(a, b, kvh, row0, scores);
    case 3: return attend_rows<3, DV>(a, b, kvh, row0, scores);
    default: return attend_rows<4, DV>(a, b, kvh, row0, scores);
  }
#else
  attend_rows<DV>(rows, a, b, kvh, row0, scores);
#endif
}

template <typename KV>
static void attend_all(const AttendArgs<KV>& a, int64_t B, int64_t Hkv, int64_t D) {
  const int64_t rows = a.G * a.S;  // query rows per KV head
  int64_t chunk = ATTEND_ROWS;  // rows per work item: up to ATTEND_ROWS, fewer where threads would wait for work
  while (chunk > 1 && B * Hkv * ((rows + chunk - 1) / chunk) < ATTEND_ITEMS * at::get_num_threads()) chunk--;
  const int64_t chunks = (rows + chunk - 1) / chunk;
  at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(ATTEND_ROWS * a.padded + ATTEND_BLOCKS);
    for (int64_t i = begin; i < end; i++) {
      const int64_t b = i / (Hkv * chunks), kvh = i / chunks % Hkv, row0 = i % chunks * chunk;
      const int n = (int)std::min(chunk, rows - row0);
      switch (D / 16) {  // head_dim as a template argument, so that a query row stays in registers
        case 1: attend_any<1>(n, a, b, kvh, row0, scores.data()); break;
        case 2: attend_any<2>(n, a, b, kvh, row0, scores.data()); break;
        case 3: attend_any<3>(n, a, b, kvh, row0, scores.data()); break;
        case 4: attend_any<4>(n, a, b, kvh, row0, scores.data()); break;
        case 5: attend_any<5>(n, a, b, kvh, row0, scores.data()); break;
        case 6: attend_any<6>(n, a, b, kvh, row0, scores.data()); break;
        case 7: attend_any<7>(n, a, b, kvh, row0, scores.data()); break;
        default: attend_any<8>(n, a, b, kvh, row0, scores.data());
      }
    }
  });
}

// softmax(q k^T / sqrt(head_dim), where mask) v: q (B, H, S, D) float32, k and v (B, Hkv, T, D) both float32 or both
// bfloat16, mask (B or 1, 1, S, T) bool (true: attend), D a multiple of 16 up to 128; (B, H, S, D) float32, as
// F.scaled_dot_product_attention with GQA on float32 copies of k and v
at::Tensor attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& m_in) {
  auto last_contiguous = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in),
                   mask = last_contiguous(m_in);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "attend takes 4-d tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == v.scalar_type() &&
              (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16) && mask.scalar_type() == at::kBool,
              "attend takes float32 q, float32 or bfloat16 k and v, and a bool mask");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(D % 16 == 0 && D <= 128 && H % Hkv == 0 && k.sizes() == v.sizes() && k.size(3) == D &&
              mask.size(2) == S && mask.size(3) == T && (mask.size(0) == 1 || mask.size(0) == B), "attend: shapes");
  at::Tensor out = at::empty({B, H, S, D}, q.options());
  auto args = [&](auto* kv) {
    using KV = std::remove_const_t<std::remove_pointer_t<decltype(kv)>>;
    return AttendArgs<KV>{q.data_ptr<float>(), k.data_ptr<KV>(), v.data_ptr<KV>(), mask.data_ptr<bool>(),
                          out.data_ptr<float>(), S, H / Hkv, T, (T + 15) / 16 * 16, q.stride(0), q.stride(1),
                          q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                          mask.size(0) == 1 ? 0 : mask.stride(0), mask.stride(2), out.stride(0), out.stride(1),
                          out.stride(2)};
  };
  if (k.scalar_type() == at::kBFloat16)
    attend_all(args((at::BFloat16*)nullptr), B, Hkv, D);
  else
    attend_all(args((float*)nullptr), B, Hkv, D);
  return out;
}

TORCH_LIBRARY(s3d_kernels, m) {
  m.def("gemv_int8(Tensor x, Tensor w) -> Tensor");
#ifdef __AVX512BF16__
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
#endif
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}
TORCH_LIBRARY_IMPL(s3d_kernels, CPU, m) {
  m.impl("gemv_int8", gemv_int8);
#ifdef __AVX512BF16__
  m.impl("gemv_bf16", gemv_bf16);
#endif
  m.impl("attend", attend);
}
"""


ISA = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma",
                  "-mprefer-vector-width=512"],
       "avx2": ["-mavx2", "-mfma"]}


def build() -> Optional[str]:
    """Which build of the kernels load() makes here: "avx512" (all three) on a CPU with AVX512_BF16, "avx2" (gemv_int8
    on vpmaddubsw, and attend) on one with AVX2 only, or None: other CPUs, or S3D_DOT_BF16=0. PyTorch's CPU capability
    decides between the two, so ATEN_CPU_CAPABILITY=avx2 runs AVX2 code throughout on an AVX-512 CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("S3D_DOT_BF16") == "0" or capability not in ("AVX2", "AVX512"):
        return None
    return "avx512" if capability == "AVX512" and torch.cpu._is_avx512_bf16_supported() else "avx2"


def may_attend() -> bool:
    """Whether compiled decode steps here will attend with `attend` (unless its build fails): cli.load keeps the
    KV cache in bfloat16 for it."""
    return build() is not None and os.environ.get("S3D_ATTEND") != "0"


def int8_kernel() -> bool:
    """Whether gemv_int8 runs here (unless its build fails): AVX512_VNNI with the AVX-512 build, or the AVX2 build."""
    isa = build()
    return os.environ.get("S3D_DOT_INT8") != "0" and (isa == "avx2" or (isa == "avx512" and torch.cpu._is_vnni_supported()))


@functools.cache
def load() -> bool:
    """Builds (once per machine; torch caches the library) and registers the kernels of this CPU's build(): all
    three with AVX512_BF16, gemv_int8 and attend with AVX2. False where there is none or the build fails (then the
    caller keeps Inductor's kernels)."""
    isa = build()
    if isa is None:
        return False
    try:
        from torch.utils.cpp_extension import load_inline

        try:  # the extension loader runs `ninja` from PATH: put the requirements' own in front of a system one
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass

        # (-fopenmp: without it at::parallel_for runs on one thread)
        # (-DINT8_BLOCK: gemv_int8 rounds its rows in model.INT8_BLOCK's blocks, as model.int8_rows does)
        load_inline("s3d_kernels" if isa == "avx512" else "s3d_kernels_avx2", cpp_sources=[SOURCE],
                    extra_cflags=["-O3", "-fopenmp", *ISA[isa], f"-DINT8_BLOCK={model.INT8_BLOCK}"],
                    extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # a missing compiler, or one without these instructions: the Inductor path still works
        log.warning("s3d: %s kernels not built (%s); few-row linear maps and attention stay Inductor's and the "
                    "library's", isa.upper(), error)
        return False

    def gemv_fake(x: Tensor, w: Tensor) -> Tensor:  # (gemv_bf16 and gemv_int8: w in blocks of 16 outputs)
        return x.new_empty((*x.shape[:-1], w.shape[0] * 16), dtype=torch.float32)

    torch.library.register_fake("s3d_kernels::gemv_int8", gemv_fake)
    if isa == "avx512":
        torch.library.register_fake("s3d_kernels::gemv_bf16", gemv_fake)
        model.DOT_BF16 = True  # model.gemv now calls gemv_bf16 for 2 to DOT_BF16_MAX_ROWS rows
    # gemv_int8 for int8 weights (the draft's copies, --quantize w8a8): every CPU with AVX512_BF16 so far has
    # AVX512_VNNI too; the AVX2 build computes the same sums with vpmaddubsw
    model.DOT_INT8 = int8_kernel()

    @torch.library.register_fake("s3d_kernels::attend")
    def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    model.ATTEND = may_attend()  # and Attention calls attend for decode steps
    return True


def gemv_bf16(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., k) @ weight.T for bfloat16 x and weight (n, k): (..., n) float32 sums (eager; compiled steps call the
    operator on a frozen model.dot_blocks(weight, 2))."""
    return torch.ops.s3d_kernels.gemv_bf16(x, model.dot_blocks(weight, 2))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True) for float32 q (B, H, S, D), k and v
    (B, Hkv, T, D) and a bool mask (B or 1, 1, S, T), with D a multiple of 16 up to 128 (eager; compiled steps call the
    operator through model.Attention)."""
    return torch.ops.s3d_kernels.attend(q, k, v, mask)


def gemv_int8(x: Tensor, weight: Tensor) -> Tensor:
    """About x (..., k) @ weight.T for an int8 weight (n, k), each row of x rounded to 8 bits first (model.int8_rows):
    (..., n) float32 sums (eager; compiled steps call the operator on a frozen model.dot_blocks(weight, 4))."""
    return torch.ops.s3d_kernels.gemv_int8(x, model.dot_blocks(weight, 4))
