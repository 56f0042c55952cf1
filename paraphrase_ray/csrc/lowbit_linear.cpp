// Fused dequantize + GEMV/small-GEMM kernels for GGUF-style low-bit weights (AVX2 + FMA + F16C).
//
// Weights are (N out, K in) in blocks of 32 along K, as llama.cpp stores them:
//   Q4_1: w = d * q + m, q in 0..15, 16 bytes per block: byte j holds q[j] (low nibble) and q[j + 16] (high)
//   Q8_0: w = d * q, q int8, 32 bytes per block
// d and m are fp16, one per block, in (N, K / 32) arrays. Each weight is rebuilt as fma(d, q, m) in fp32,
// which is exactly the fp32 value the dequantized model holds (d * q is exact in fp32), so the only
// difference to an fp32 Linear is the order of the sums. Activations and accumulation are fp32.
//
// y (M, N) = x (M, K) @ W^T (+ bias). Parallel over output rows (at::parallel_for, torch's thread count);
// for M > 1 the rows of x are taken MT at a time inside the loop over a row's blocks, so a weight block is
// fetched from memory once per call and served from L1 for the remaining row tiles.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int64_t QK = 32;
constexpr int64_t ROW_CHUNK = 16;  // output rows per x-tile sweep (their blocks stay in L1 / L2)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// The 32 weights of one block as 4 x 8 floats.
struct Q41 {
  static inline void load(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int64_t b, __m256 w[4]) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    const __m256 vd = _mm256_set1_ps(h2f(d[b]));
    const __m256 vm = _mm256_set1_ps(h2f(m[b]));
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm);
  }
  static constexpr int64_t bytes_per_block = 16;
};

struct Q80 {
  static inline void load(const uint8_t* qs, const uint16_t* d, const uint16_t*, int64_t b, __m256 w[4]) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 32));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 32 + 16));
    const __m256 vd = _mm256_set1_ps(h2f(d[b]));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), vd);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))), vd);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), vd);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8))), vd);
  }
  static constexpr int64_t bytes_per_block = 32;
};

// One output row n against MT rows of x; NA independent accumulators per x row hide the FMA latency.
template <class F, int MT>
inline void row_tile(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int64_t nb, const float* x,
                     int64_t ldx, float* y, int64_t ldy, float bias) {
  constexpr int NA = MT == 1 ? 4 : 2;
  __m256 acc[MT][NA];
  for (int j = 0; j < MT; ++j)
    for (int a = 0; a < NA; ++a) acc[j][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 w[4];
    F::load(qs, d, m, b, w);
    for (int j = 0; j < MT; ++j) {
      const float* xb = x + j * ldx + b * QK;
      for (int i = 0; i < 4; ++i)
        acc[j][i % NA] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xb + 8 * i), acc[j][i % NA]);
    }
  }
  for (int j = 0; j < MT; ++j) {
    __m256 s = acc[j][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[j][a]);
    y[j * ldy] = hsum(s) + bias;
  }
}

template <class F>
torch::Tensor lowbit_mm(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                        const c10::optional<torch::Tensor>& m, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous fp32 (M, K)");
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.is_contiguous() && qs.dim() == 2, "qs: contiguous uint8 (N, *)");
  TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous(), "d: contiguous fp16 (N, K / 32)");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % QK == 0 && d.numel() == N * (K / QK), "shape mismatch: K=", K, " N=", N);
  TORCH_CHECK(qs.size(1) == (K / QK) * F::bytes_per_block, "qs has ", qs.size(1), " bytes per row");
  const uint16_t* mp = nullptr;
  if (m.has_value()) {
    TORCH_CHECK(m->scalar_type() == torch::kHalf && m->is_contiguous() && m->numel() == d.numel(), "m: like d");
    mp = reinterpret_cast<const uint16_t*>(m->data_ptr<at::Half>());
  }
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: fp32 (N,)");
    bp = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const int64_t nb = K / QK, qrow = nb * F::bytes_per_block;
  at::parallel_for(0, N, ROW_CHUNK, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += ROW_CHUNK) {
      const int64_t n1 = std::min(end, n0 + ROW_CHUNK);
      for (int64_t r = 0; r < M;) {
        const int64_t left = M - r;
        const int mt = left >= 4 ? 4 : static_cast<int>(left);
        for (int64_t n = n0; n < n1; ++n) {
          const uint8_t* q = qp + n * qrow;
          const uint16_t* dn = dp + n * nb;
          const uint16_t* mn = mp ? mp + n * nb : nullptr;
          const float bn = bp ? bp[n] : 0.f;
          const float* xr = xp + r * K;
          float* yr = yp + r * N + n;
          switch (mt) {
            case 4: row_tile<F, 4>(q, dn, mn, nb, xr, K, yr, N, bn); break;
            case 3: row_tile<F, 3>(q, dn, mn, nb, xr, K, yr, N, bn); break;
            case 2: row_tile<F, 2>(q, dn, mn, nb, xr, K, yr, N, bn); break;
            default: row_tile<F, 1>(q, dn, mn, nb, xr, K, yr, N, bn); break;
          }
        }
        r += mt;
      }
    }
  });
  return y;
}

}  // namespace

torch::Tensor q4_1_mm(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m,
                      const c10::optional<torch::Tensor>& bias) {
  return lowbit_mm<Q41>(x, qs, d, m, bias);
}

torch::Tensor q8_0_mm(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                      const c10::optional<torch::Tensor>& bias) {
  return lowbit_mm<Q80>(x, qs, d, c10::nullopt, bias);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_1_mm", &q4_1_mm, "y = x @ dequant(Q4_1)^T + bias");
  mod.def("q8_0_mm", &q8_0_mm, "y = x @ dequant(Q8_0)^T + bias");
}
