// Attention of one new query per head over a key/value cache shared by all heads (multi-query
// attention), for decoding on x86 CPUs with AVX2 + FMA.
//
// Decoding attends over a preallocated cache whose later slots are still empty and masked out.
// This kernel skips masked keys instead of scoring them, reads each cached key and value once for
// all heads, and splits the keys of a sequence across threads (each chunk keeps its own running
// maximum, normalizer and weighted sum; the chunks are merged at the end), where PyTorch's
// attention scores every slot of the cache on one thread per sequence.
//
//   out[b, h] = sum_j softmax_j(scale * q[b, h] . k[b, j]) v[b, j]     over the keys j with mask[b, j]
//   q: (B, 1, H, D)   k, v: (B, 1, N, D), rows contiguous   mask: (B, 1, 1, N) bool   out: like q

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

using palm_simd::hsum;

inline __m256 widen8(const at::BFloat16* p) {  // bf16 is the high half of an fp32
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// e^x for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes expf's
// coefficients, relative error ~1e-7), 2^n through the exponent bits; below -87 the result is 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// Eight dot products (one per accumulator) from their lane-wise partial sums.
inline __m256 reduce8(const __m256* a) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

constexpr int64_t kBlock = 8;  // keys scored and summed together

// What a run of keys contributes, per head: its largest score, the sum of e^(score - max), and
// the sum of e^(score - max) * v (D values).
struct Partial {
  std::vector<float> max, sum, weighted;
};

// Pointers to the fp32 rows of block [t0, t0 + kBlock) of `keys` (zeros past n). fp32 rows are
// used in place; bf16 rows are widened once into `buffer`, not once per head.
inline void block_rows(const float* base, int64_t stride, const int64_t* keys, int64_t t0, int64_t n, int64_t D,
                       const float* zeros, float* /*buffer*/, const float** rows) {
  for (int64_t i = 0; i < kBlock; ++i) rows[i] = t0 + i < n ? base + keys[t0 + i] * stride : zeros;
}

inline void block_rows(const at::BFloat16* base, int64_t stride, const int64_t* keys, int64_t t0, int64_t n,
                       int64_t D, const float* zeros, float* buffer, const float** rows) {
  for (int64_t i = 0; i < kBlock; ++i) {
    if (t0 + i >= n) {
      rows[i] = zeros;
      continue;
    }
    const at::BFloat16* row = base + keys[t0 + i] * stride;
    float* out = buffer + i * D;
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, widen8(row + d));
    rows[i] = out;
  }
}

// dst[0, 8W) += sum_i p[i] * rows[i][d0, d0 + 8W), the sums held in W registers.
template <int W>
inline void weigh_values(const float* p, const float* const* rows, int64_t d0, float* dst) {
  __m256 acc[W];
  for (int u = 0; u < W; ++u) acc[u] = _mm256_loadu_ps(dst + 8 * u);
  for (int64_t i = 0; i < kBlock; ++i) {
    const __m256 w = _mm256_set1_ps(p[i]);
#pragma GCC unroll 8
    for (int u = 0; u < W; ++u) acc[u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(rows[i] + d0 + 8 * u), acc[u]);
  }
  for (int u = 0; u < W; ++u) _mm256_storeu_ps(dst + 8 * u, acc[u]);
}

// Keys `keys[0, n)` of one sequence against its H queries; D is a multiple of 8.
template <typename T>
void attend_keys(const float* q, const T* k, const T* v, int64_t key_stride, const int64_t* keys, int64_t n,
                 int64_t H, int64_t D, float scale, Partial& out) {
  out.max.assign(H, -std::numeric_limits<float>::infinity());
  out.sum.assign(H, 0.0f);
  out.weighted.assign(H * D, 0.0f);
  if (n == 0) return;
  const int64_t padded = (n + kBlock - 1) / kBlock * kBlock;
  const std::vector<float> zeros(D, 0.0f);  // stands in for the missing keys of the last block
  std::vector<float> buffer(kBlock * D);
  std::vector<float> scores(H * padded);

  // scores[h, t] = scale * q[h] . k[keys[t]], eight keys at a time: each key row is read for all
  // heads while it is in L1, and eight independent sums keep the FMA units busy.
  for (int64_t t0 = 0; t0 < padded; t0 += kBlock) {
    const float* rows[kBlock];
    block_rows(k, key_stride, keys, t0, n, D, zeros.data(), buffer.data(), rows);
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q + h * D;
      __m256 acc[kBlock];
      for (int64_t i = 0; i < kBlock; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qh + d);
#pragma GCC unroll 8
        for (int64_t i = 0; i < kBlock; ++i) acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[i] + d), acc[i]);
      }
      _mm256_storeu_ps(scores.data() + h * padded + t0, _mm256_mul_ps(reduce8(acc), _mm256_set1_ps(scale)));
    }
  }
  // scores become e^(score - max) per head (the padding keys' weights are zeroed)
  for (int64_t h = 0; h < H; ++h) {
    float* s = scores.data() + h * padded;
    const float m = *std::max_element(s, s + n);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8) {
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
      if (t + 8 > n) {  // the last block: keep only real keys (a padding key's e may be inf)
        alignas(32) int32_t keep[8];
        for (int64_t i = 0; i < 8; ++i) keep[i] = t + i < n ? -1 : 0;
        e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(keep))));
      }
      _mm256_storeu_ps(s + t, e);
      total = _mm256_add_ps(total, e);
    }
    out.max[h] = m;
    out.sum[h] = hsum(total);
  }
  // weighted[h] = sum_t scores[h, t] * v[keys[t]], 64 output values per pass
  for (int64_t t0 = 0; t0 < padded; t0 += kBlock) {
    const float* rows[kBlock];
    block_rows(v, key_stride, keys, t0, n, D, zeros.data(), buffer.data(), rows);
    for (int64_t h = 0; h < H; ++h) {
      const float* p = scores.data() + h * padded + t0;
      float* dst = out.weighted.data() + h * D;
      int64_t d0 = 0;
      for (; d0 + 64 <= D; d0 += 64) weigh_values<8>(p, rows, d0, dst + d0);
      switch ((D - d0) / 8) {
        case 1: weigh_values<1>(p, rows, d0, dst + d0); break;
        case 2: weigh_values<2>(p, rows, d0, dst + d0); break;
        case 3: weigh_values<3>(p, rows, d0, dst + d0); break;
        case 4: weigh_values<4>(p, rows, d0, dst + d0); break;
        case 5: weigh_values<5>(p, rows, d0, dst + d0); break;
        case 6: weigh_values<6>(p, rows, d0, dst + d0); break;
        case 7: weigh_values<7>(p, rows, d0, dst + d0); break;
        default: break;
      }
    }
  }
}

template <typename T>
void decode_attention_impl(const float* q, const T* k, const T* v, int64_t batch_stride, int64_t key_stride,
                           const bool* mask, int64_t mask_batch_stride, int64_t mask_stride, float* out,
                           int64_t B, int64_t N, int64_t H, int64_t D, float scale) {
  // The visible keys of each sequence, split into enough runs to keep every thread busy (none
  // shorter than 64 keys).
  std::vector<std::vector<int64_t>> visible(B);
  size_t most = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < N; ++j)
      if (mask == nullptr || mask[b * mask_batch_stride + j * mask_stride]) visible[b].push_back(j);
    most = std::max(most, visible[b].size());
  }
  const int64_t threads = at::get_num_threads();
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>((static_cast<int64_t>(most) + 63) / 64, (2 * threads + B - 1) / B));
  std::vector<Partial> partials(B * chunks);
  at::parallel_for(0, B * chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t count = static_cast<int64_t>(visible[b].size());
      const int64_t per_chunk = (count + chunks - 1) / chunks;
      const int64_t begin = std::min(count, c * per_chunk), end = std::min(count, begin + per_chunk);
      attend_keys<T>(q + b * H * D, k + b * batch_stride, v + b * batch_stride, key_stride,
                     visible[b].data() + begin, end - begin, H, D, scale, partials[task]);
    }
  });
  // Merge the runs of each sequence: rescale each to the overall maximum.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, partials[b * chunks + c].max[h]);
      float* o = out + (b * H + h) * D;
      std::fill(o, o + D, 0.0f);
      if (m == -std::numeric_limits<float>::infinity()) continue;  // no key visible: zeros
      float sum = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const Partial& p = partials[b * chunks + c];
        if (p.sum[h] == 0.0f) continue;
        const float w = std::exp(p.max[h] - m);
        sum += w * p.sum[h];
        for (int64_t d = 0; d < D; ++d) o[d] += w * p.weighted[h * D + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= sum;
    }
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(1) == 1 && k.size(1) == 1,
              "decode_attention: q (B, 1, H, D) and k, v (B, 1, N, D) expected");
  TORCH_CHECK(k.sizes() == v.sizes() && k.strides() == v.strides() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "decode_attention: k and v must match each other and q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode_attention: q, k, v must all be float32 or all bfloat16");
  TORCH_CHECK(k.stride(3) == 1, "decode_attention: cache rows must be contiguous");
  TORCH_CHECK(q.size(3) % 8 == 0, "decode_attention: head dimension must be a multiple of 8");
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3), N = k.size(2);
  const bool* mask_ptr = nullptr;
  int64_t mask_batch_stride = 0, mask_stride = 0;
  torch::Tensor expanded;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(2) == 1 && mask->size(-1) == N,
                "decode_attention: mask must be bool (B, 1, 1, N)");
    expanded = mask->expand({B, 1, 1, N});
    mask_ptr = expanded.data_ptr<bool>();
    mask_batch_stride = expanded.stride(0);
    mask_stride = expanded.stride(3);
  }
  auto q32 = q.to(at::kFloat).contiguous();
  auto out = torch::empty({B, 1, H, D}, q32.options());
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat)
    decode_attention_impl<float>(q32.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), k.stride(0),
                                 k.stride(2), mask_ptr, mask_batch_stride, mask_stride, out.data_ptr<float>(), B, N,
                                 H, D, s);
  else
    decode_attention_impl<at::BFloat16>(q32.data_ptr<float>(), k.data_ptr<at::BFloat16>(),
                                        v.data_ptr<at::BFloat16>(), k.stride(0), k.stride(2), mask_ptr,
                                        mask_batch_stride, mask_stride, out.data_ptr<float>(), B, N, H, D, s);
  return out.to(q.scalar_type());
}

TORCH_LIBRARY_IMPL(palm, CPU, m) { m.impl("decode_attention", &decode_attention); }
