// Matrix-vector products for decoding on x86 CPUs with AVX2 + FMA.
//
// Decoding one token reads every weight once, so its speed is set by memory bandwidth. These
// kernels stream each weight row once for up to 8 activation rows at a time, several rows at once
// to keep memory busy, and keep the per-weight instruction count low so that narrow weights
// (bf16, int8) are not limited by arithmetic instead:
//   fp32  fused multiply-add against x;
//   bf16  a 32-bit lane holds two bf16 values: a shift and a mask turn it into two fp32 vectors
//         (even and odd elements), matched by a copy of x split the same way;
//   int8  widened to int16 and multiplied by x rounded to int16 (one scale per row, 14 bits or
//         more: far finer than the weights' own rounding) with pairwise-adding integer products.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]       x: (M, K) fp32, w: (N, K), y: (M, N) fp32
//
// fp32 weights against two rows or more (a serving batch, a prefill of up to 64 tokens) go to a
// tiled kernel instead: from a few rows on, fp32 products are bound by arithmetic rather than
// memory, and it keeps each weight row in the cache across all of x (see tiled_f32).

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using palm_simd::hsum;

constexpr int64_t kStep = 32;  // weights of one row consumed per step

constexpr int64_t kPrefetchRows = 4;  // rows ahead in rows_kernel (two_stream_kernel streams instead)

// Fetch the weights one step consumes, kPrefetchRows rows ahead (prefetches never fault).
template <typename W>
inline void prefetch(const W* p) {
#pragma GCC unroll 4
  for (size_t b = 0; b < kStep * sizeof(W); b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

struct F32 {
  static constexpr bool kPrefetch = false;  // the hardware prefetcher keeps up with fp32 rows
  static constexpr bool kStreamsAtBatch1 = false;  // four rows at a time measured faster
  using W = float;
  using X = float;
  using Acc = __m256;
  static Acc zero() { return _mm256_setzero_ps(); }
  template <int M>
  static void step(const W* w, const X* x, int64_t K, Acc* acc) {
    for (int u = 0; u < 4; ++u) {
      __m256 wv = _mm256_loadu_ps(w + 8 * u);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + 8 * u), wv, acc[m]);
    }
  }
  static float finish(Acc acc) { return hsum(acc); }
  static float value(W v) { return v; }
};

struct BF16 {
  static constexpr bool kPrefetch = true;
  static constexpr bool kStreamsAtBatch1 = true;
  using W = at::BFloat16;
  using X = float;  // each block of 16 holds x's 8 even-indexed values, then its 8 odd-indexed ones
  using Acc = __m256;
  static Acc zero() { return _mm256_setzero_ps(); }
  // The 16 bf16 weights at w as fp32: even-indexed ones in `even`, odd-indexed ones in `odd`.
  static void widen(const W* w, __m256* even, __m256* odd) {
    const __m256i raw = load256(w);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  template <int M>
  static void step(const W* w, const X* x, int64_t K, Acc* acc) {
    for (int h = 0; h < 2; ++h) {
      __m256 even, odd;
      widen(w + 16 * h, &even, &odd);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + 16 * h), even, acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + 16 * h + 8), odd, acc[m]);
      }
    }
  }
  // One row against one x (batch 1), even and odd elements in separate accumulators.
  static void step_one_row(const W* w, const X* x, Acc* acc) {
    for (int h = 0; h < 2; ++h) {
      __m256 even, odd;
      widen(w + 16 * h, &even, &odd);
      acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16 * h), even, acc[0]);
      acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16 * h + 8), odd, acc[1]);
    }
  }
  static Acc add(Acc a, Acc b) { return _mm256_add_ps(a, b); }
  static float finish(Acc acc) { return hsum(acc); }
  static float value(W v) { return static_cast<float>(v); }
};

struct I8 {
  static constexpr bool kPrefetch = true;
  static constexpr bool kStreamsAtBatch1 = true;
  using W = int8_t;
  using X = int16_t;
  using Acc = __m256i;
  static Acc zero() { return _mm256_setzero_si256(); }
  // The 32 int8 weights at w as int16: the first 16 in `lo`, the next 16 in `hi`.
  static void widen(const W* w, __m256i* lo, __m256i* hi) {
    *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
  }
  template <int M>
  static void step(const W* w, const X* x, int64_t K, Acc* acc) {
    __m256i lo, hi;
    widen(w, &lo, &hi);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(lo, load256(x + m * K)));
      acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(hi, load256(x + m * K + 16)));
    }
  }
  static void step_one_row(const W* w, const X* x, Acc* acc) {
    __m256i lo, hi;
    widen(w, &lo, &hi);
    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(lo, load256(x)));
    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(hi, load256(x + 16)));
  }
  static Acc add(Acc a, Acc b) { return _mm256_add_epi32(a, b); }
  static float finish(Acc acc) { return static_cast<float>(hsum(acc)); }
  static float value(W v) { return static_cast<float>(v); }
};

// Rows [n_begin, n_end) of w against M rows of x, R weight rows at a time. `xp` is x prepared
// for T (x_scale[m] undoes any rescaling); the tail past the last full step uses plain `x`.
template <typename T, int M, int R>
void rows_kernel(const typename T::W* w, const typename T::X* xp, const float* x, const float* x_scale,
                 const float* scale, float* y, int64_t K, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t K_vec = K / kStep * kStep;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) {
    typename T::Acc acc[R][M];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = T::zero();
    for (int64_t k = 0; k < K_vec; k += kStep) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (T::kPrefetch) prefetch(w + (n + r + kPrefetchRows) * K + k);
        T::template step<M>(w + (n + r) * K + k, xp + k, K, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const typename T::W* row = w + (n + r) * K;
      for (int m = 0; m < M; ++m) {
        float sum = T::finish(acc[r][m]) * (x_scale ? x_scale[m] : 1.0f);
        for (int64_t k = K_vec; k < K; ++k) sum += x[m * K + k] * T::value(row[k]);
        y[m * N + n + r] = scale ? sum * scale[n + r] : sum;
      }
    }
  }
  if (n < n_end) rows_kernel<T, M, 1>(w, xp, x, x_scale, scale, y, K, N, n, n_end);
}

// Batch 1 with bf16 or int8 weights: each thread walks its rows as two sequential streams (the
// first and the second half of its share, one row of each in turn), prefetched
// kStreamPrefetchBytes ahead once per cache line, two accumulators per row to keep the
// multiply-adds' dependency chains short. Measured on the 150m model's int8 matrices: one stream
// per thread was -14..-16% time against four rows at a time (Zen 1), two streams -14% against one
// (Zen 3: 29.0 -> 33.7 GB/s); fp32 was slower this way, so it keeps rows_kernel.
constexpr int64_t kStreamPrefetchBytes = 1024;

template <typename T, int S>
void stream_rows(const typename T::W* w, const typename T::X* xp, const float* x, float x_scale,
                 const float* scale, float* y, int64_t K, const int64_t (&rows)[S]) {
  const int64_t K_vec = K / kStep * kStep;
  typename T::Acc acc[S][2];
  for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = T::zero();
  for (int64_t k = 0; k < K_vec; k += kStep) {
    if ((k * sizeof(typename T::W)) % 64 == 0)
      for (int s = 0; s < S; ++s)
        _mm_prefetch(reinterpret_cast<const char*>(w + rows[s] * K + k) + kStreamPrefetchBytes, _MM_HINT_T0);
    for (int s = 0; s < S; ++s) T::step_one_row(w + rows[s] * K + k, xp + k, acc[s]);
  }
  for (int s = 0; s < S; ++s) {
    const typename T::W* row = w + rows[s] * K;
    float sum = T::finish(T::add(acc[s][0], acc[s][1])) * x_scale;
    for (int64_t k = K_vec; k < K; ++k) sum += x[k] * T::value(row[k]);
    y[rows[s]] = scale ? sum * scale[rows[s]] : sum;
  }
}

template <typename T>
void two_stream_kernel(const typename T::W* w, const typename T::X* xp, const float* x, const float* x_scale,
                       const float* scale, float* y, int64_t K, int64_t n_begin, int64_t n_end) {
  const float xs = x_scale ? x_scale[0] : 1.0f;
  const int64_t half = (n_end - n_begin) / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t pair[2] = {n_begin + i, n_begin + half + i};
    stream_rows<T, 2>(w, xp, x, xs, scale, y, K, pair);
  }
  if ((n_end - n_begin) % 2) {
    const int64_t last[1] = {n_end - 1};
    stream_rows<T, 1>(w, xp, x, xs, scale, y, K, last);
  }
}

template <typename T>
void gemv_impl(const typename T::W* w, const typename T::X* xp, const float* x, const float* x_scale,
               const float* scale, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t grain = std::max<int64_t>(4, (1 << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t rows = std::min<int64_t>(8, M - m0);
      auto* xm = xp + m0 * K;
      const float* x_plain = x + m0 * K;
      const float* xs = x_scale ? x_scale + m0 : nullptr;
      float* ym = y + m0 * N;
      switch (rows) {
        case 1:
          if constexpr (T::kStreamsAtBatch1) two_stream_kernel<T>(w, xm, x_plain, xs, scale, ym, K, begin, end);
          else rows_kernel<T, 1, 4>(w, xm, x_plain, xs, scale, ym, K, N, begin, end);
          break;
        case 2: rows_kernel<T, 2, 2>(w, xm, x_plain, xs, scale, ym, K, N, begin, end); break;
        case 3: rows_kernel<T, 3, 1>(w, xm, x_plain, xs, scale, ym, K, N, begin, end); break;
        case 4: rows_kernel<T, 4, 1>(w, xm, x_plain, xs, scale, ym, K, N, begin, end); break;
        case 5: rows_kernel<T, 5, 1>(w, xm, x_plain, xs, scale, ym, K, N, begin, end); break;
        case 6: rows_kernel<T, 6, 1>(w, xm, x_plain, xs, scale, ym, K, N, begin, end); break;
        case 7: rows_kernel<T, 7, 1>(w, xm, x_plain, xs, scale, ym, K, N, begin, end); break;
        default: rows_kernel<T, 8, 1>(w, xm, x_plain, xs, scale, ym, K, N, begin, end); break;
      }
    }
  });
}

// x with each block of 16 split into its even- then odd-indexed values (see BF16).
std::vector<float> split_even_odd(const float* x, int64_t M, int64_t K) {
  std::vector<float> out(x, x + M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k + 16 <= K / kStep * kStep; k += 16)
      for (int j = 0; j < 8; ++j) {
        out[m * K + k + j] = x[m * K + k + 2 * j];
        out[m * K + k + 8 + j] = x[m * K + k + 2 * j + 1];
      }
  return out;
}

// x rounded to int16 with one scale per row, as many levels as int32 sums over K allow.
std::vector<int16_t> round_to_int16(const float* x, int64_t M, int64_t K, std::vector<float>& x_scale) {
  // each int32 lane adds K / 16 products of pairs, each at most 2 * 127 * levels
  const double lane_terms = static_cast<double>(K / 16 + 1) * 2 * 127;
  const float levels = static_cast<float>(std::min(16383.0, std::floor(2147483647.0 / lane_terms)));
  std::vector<int16_t> out(M * K);
  x_scale.assign(M, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    float max_abs = 0.0f;
    for (int64_t k = 0; k < K; ++k) max_abs = std::max(max_abs, std::fabs(x[m * K + k]));
    const float s = max_abs > 0.0f ? max_abs / levels : 1.0f;
    x_scale[m] = s;
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = static_cast<int16_t>(std::nearbyint(x[m * K + k] / s));
  }
  return out;
}

// A tile of MR rows of x by NR rows of w over all of K: MR x NR accumulators, with x's MR vectors
// loaded once per step and each weight vector used MR times. 3 x 4 fills the 16 AVX2 registers
// (12 accumulators, 3 of x, 1 of w): 7 loads per 12 multiply-adds, where the row kernel above
// needs 9 per 8. On Zen 3 (benchmarks/gemv.py --rows) the 150m model's products of 16-64 rows
// ran 1.12-1.33x as fast as oneDNN's, up to 141 GFLOP/s (90% of two cores' peak), and those of
// 2-8 rows as fast as the row kernel's or a little faster.
template <int MR, int NR>
inline void tile_f32(const float* x, const float* w, const float* scale, float* y, int64_t K, int64_t N,
                     const float* prefetch_rows) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  // Vector steps up to the row kernel's boundary, not K / 8 * 8: each lane then sums the same
  // products in the same order as rows_kernel, so that a row gets the same result alone (M = 1)
  // as in a batch.
  const int64_t K_vec = K / kStep * kStep;
  for (int64_t k = 0; k < K_vec; k += 8) {
    if (prefetch_rows && k % 16 == 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(prefetch_rows + r * K + k), _MM_HINT_T0);
    __m256 xv[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * K + k);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) acc[i][r] = _mm256_fmadd_ps(xv[i], wv, acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      float sum = hsum(acc[i][r]);
      for (int64_t k = K_vec; k < K; ++k) sum += x[i * K + k] * w[r * K + k];
      y[i * N + r] = scale ? sum * scale[r] : sum;
    }
}

// NR rows of w against all M rows of x, MR at a time: the weight rows are read from memory by
// the first tile and from the cache by the others (L1 for rows of up to ~1,500 weights, else
// L2). The first tile also prefetches the next NR rows, so that memory is busy while the other
// tiles compute (8 rows: 15% less time in an A/B run).
template <int NR>
void weight_rows_f32(const float* x, const float* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                     const float* next) {
  constexpr int MR = 3;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile_f32<MR, NR>(x + m * K, w, scale, y + m * N, K, N, m == 0 ? next : nullptr);
  for (; m < M; ++m) tile_f32<1, NR>(x + m * K, w, scale, y + m * N, K, N, m == 0 ? next : nullptr);
}

// The weight rows are handed out in chunks to whichever thread asks next rather than split in
// equal shares up front: a thread that loses its core for a while (the server's event loop,
// another process) then holds up the product by about half that time instead of all of it.
void tiled_f32(const float* w, const float* x, const float* scale, float* y, int64_t M, int64_t K, int64_t N) {
  constexpr int NR = 4;
  // About 1M multiply-adds a chunk, and at least four chunks a thread. Tried and not kept: chunks
  // of at least 16 rows (a whole cache line of each row of y) with the prefetch crossing chunk
  // ends, 3-5% slower on the 150m model's prefill and 16-row decoding steps.
  const int64_t threads = at::get_num_threads();
  const int64_t by_work = (1 << 20) / std::max<int64_t>(M * K, 1);
  const int64_t by_share = N / (4 * threads);
  const int64_t chunk = NR * std::max<int64_t>(1, std::min(by_work, by_share) / NR);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk)) < N;) {
      const int64_t n_end = std::min(N, begin + chunk);
      int64_t n = begin;
      for (; n + NR <= n_end; n += NR)
        weight_rows_f32<NR>(x, w + n * K, scale ? scale + n : nullptr, y + n, M, K, N,
                            n + 2 * NR <= n_end ? w + (n + NR) * K : nullptr);
      for (; n < n_end; ++n) weight_rows_f32<1>(x, w + n * K, scale ? scale + n : nullptr, y + n, M, K, N, nullptr);
    }
  });
}

}  // namespace

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x (M, K) and w (N, K) expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gemv: x must be float32");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "gemv: contiguous inputs expected");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* scale_ptr = nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == N && scale->is_contiguous(), "gemv: scale must be float32 (N,)");
    scale_ptr = scale->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xs = x.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat:
      if (M >= 2) tiled_f32(w.data_ptr<float>(), xs, scale_ptr, ys, M, K, N);
      else gemv_impl<F32>(w.data_ptr<float>(), xs, xs, nullptr, scale_ptr, ys, M, K, N);
      break;
    case at::kBFloat16: {
      std::vector<float> split = split_even_odd(xs, M, K);
      gemv_impl<BF16>(w.data_ptr<at::BFloat16>(), split.data(), xs, nullptr, scale_ptr, ys, M, K, N);
      break;
    }
    case at::kChar: {
      std::vector<float> x_scale;
      std::vector<int16_t> rounded = round_to_int16(xs, M, K, x_scale);
      gemv_impl<I8>(w.data_ptr<int8_t>(), rounded.data(), xs, x_scale.data(), scale_ptr, ys, M, K, N);
      break;
    }
    default:
      TORCH_CHECK(false, "gemv: weights must be float32, bfloat16 or int8");
  }
  return y;
}

// Registered with the dispatcher (schema defined in palm/kernels/decode.py): a call costs a few
// microseconds, against ~40 for a Python-level custom op, and a decode step makes dozens.
TORCH_LIBRARY_IMPL(palm, CPU, m) { m.impl("gemv", &gemv); }
