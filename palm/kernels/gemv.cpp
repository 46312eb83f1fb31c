// Matrix-vector products for decoding on x86 CPUs with AVX2 + FMA.
//
// Decoding one token reads every weight once, so its speed is set by memory bandwidth. These
// kernels stream each weight row once for up to 8 activation rows at a time, reading fp32, bf16 or
// int8 weights and widening them to fp32 in registers (the CPU needs no bf16 or VNNI support).
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]       x: (M, K) fp32, w: (N, K), y: (M, N) fp32

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

// Load 32 consecutive weights as four vectors of 8 fp32.
inline void load32(const float* p, __m256 out[4]) {
  for (int u = 0; u < 4; ++u) out[u] = _mm256_loadu_ps(p + 8 * u);
}

inline __m256 widen_bf16(__m128i raw) {
  // bf16 is the top half of an fp32: widen to 32 bits and shift into place.
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline void load32(const at::BFloat16* p, __m256 out[4]) {
  for (int half = 0; half < 2; ++half) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * half));
    out[2 * half] = widen_bf16(_mm256_castsi256_si128(raw));
    out[2 * half + 1] = widen_bf16(_mm256_extracti128_si256(raw, 1));
  }
}

inline void load32(const int8_t* p, __m256 out[4]) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  __m128i lo = _mm256_castsi256_si128(raw), hi = _mm256_extracti128_si256(raw, 1);
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// M activation rows against weight rows [n_begin, n_end), 32 weights per step. With few rows,
// U independent accumulators per row hide the FMA latency.
template <int M, typename W>
void rows_kernel(const float* x, const W* w, const float* scale, float* y,
                 int64_t K, int64_t N, int64_t n_begin, int64_t n_end) {
  constexpr int U = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t K_vec = K / 32 * 32;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* row = w + n * K;
    __m256 acc[M][U];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K_vec; k += 32) {
      __m256 wv[4];
      load32(row + k, wv);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
          acc[m][u % U] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8 * u), wv[u], acc[m][u % U]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int u = 1; u < U; ++u) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][u]);
      float sum = hsum(acc[m][0]);
      for (int64_t k = K_vec; k < K; ++k) sum += x[m * K + k] * to_float(row[k]);
      y[m * N + n] = scale ? sum * scale[n] : sum;
    }
  }
}

template <typename W>
void gemv_impl(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N) {
  // Enough rows per task that each streams a good stretch of memory.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t rows = std::min<int64_t>(8, M - m0);
      const float* xm = x + m0 * K;
      float* ym = y + m0 * N;
      switch (rows) {
        case 1: rows_kernel<1>(xm, w, scale, ym, K, N, begin, end); break;
        case 2: rows_kernel<2>(xm, w, scale, ym, K, N, begin, end); break;
        case 3: rows_kernel<3>(xm, w, scale, ym, K, N, begin, end); break;
        case 4: rows_kernel<4>(xm, w, scale, ym, K, N, begin, end); break;
        case 5: rows_kernel<5>(xm, w, scale, ym, K, N, begin, end); break;
        case 6: rows_kernel<6>(xm, w, scale, ym, K, N, begin, end); break;
        case 7: rows_kernel<7>(xm, w, scale, ym, K, N, begin, end); break;
        default: rows_kernel<8>(xm, w, scale, ym, K, N, begin, end); break;
      }
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
  switch (w.scalar_type()) {
    case at::kFloat: gemv_impl(x.data_ptr<float>(), w.data_ptr<float>(), scale_ptr, y.data_ptr<float>(), M, K, N); break;
    case at::kBFloat16: gemv_impl(x.data_ptr<float>(), w.data_ptr<at::BFloat16>(), scale_ptr, y.data_ptr<float>(), M, K, N); break;
    case at::kChar: gemv_impl(x.data_ptr<float>(), w.data_ptr<int8_t>(), scale_ptr, y.data_ptr<float>(), M, K, N); break;
    default: TORCH_CHECK(false, "gemv: weights must be float32, bfloat16 or int8");
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = (x @ w.T) * scale for a few rows of x, weights fp32/bf16/int8");
}
