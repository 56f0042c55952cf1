// Fused dequantize + GEMV/small-GEMM kernels for GGUF-style low-bit weights (AVX2 + FMA + F16C).
//
// Weights are (N out, K in) in blocks of 32 along K, as llama.cpp stores them:
//   Q4_1: w = d * q + m, q in 0..15, 16 bytes per block: byte j holds q[j] (low nibble) and q[j + 16] (high)
//   Q8_0: w = d * q, q int8, 32 bytes per block
// d and m are fp16, one per block, in (N, K / 32) arrays. The weights are exactly the fp32 values of the
// dequantized model; the kernel computes sum_b [d_b (q_b . x_b) + m_b sum(x_b)], which is sum_k w_k x_k in
// another order, so only float rounding differs from an fp32 Linear. Activations and accumulation are fp32.
//
// y (M, N) = x (M, K) @ W^T (+ bias). Parallel over output rows (at::parallel_for, torch's thread count);
// for M > 1 the rows of x are taken 4 at a time inside the loop over a weight row's blocks, so a weight block
// is fetched from memory once per call and served from L1 for the remaining row tiles.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;
constexpr int64_t ROW_CHUNK = 16;  // grain of the split over output rows
int64_t DENSE_MIN_ROWS = 8;  // from this many rows of x on, rebuild weight rows in fp32 and run a dense tile

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// The 32 quants of one block as 4 x 8 floats (elements 0-7, 8-15, 16-23, 24-31); loads fold into vpmov*xbd.
struct Q41 {
  static inline void quants(const uint8_t* blk, __m256 q[4]) {
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk)));
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 8)));
    const __m256i lo = _mm256_set1_epi32(0x0F);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(c, lo));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));
  }
  static constexpr int64_t bytes_per_block = 16;
};

struct Q80 {
  static inline void quants(const uint8_t* blk, __m256 q[4]) {
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 8 * i))));
  }
  static constexpr int64_t bytes_per_block = 32;
};

// fp16 -> fp32 for n values (8 at a time, then the tail)
inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = h2f(h[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
  float r = hsum(s);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// One block of one weight row against MT rows of x: acc[j] += d * sum_i q_i x_j,i (the m term is added apart).
template <class F, int MT>
inline void block_step(const uint8_t* blk, const float* dv, const float* x, int64_t ldx, __m256 (&acc)[MT]) {
  __m256 q[4];
  F::quants(blk, q);
  const __m256 vd = _mm256_broadcast_ss(dv);
  for (int j = 0; j < MT; ++j) {
    const float* xb = x + j * ldx;
    __m256 p = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
    p = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), p);
    p = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), p);
    p = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), p);
    acc[j] = _mm256_fmadd_ps(vd, p, acc[j]);
  }
}

// y[j] = sum_b d_b (q_b . x_j,b), for one weight row and MT rows of x; two accumulator sets (even / odd blocks)
// so the accumulation chain does not bound the loop.
template <class F, int MT>
inline void row_tile(const uint8_t* qs, const float* dv, int64_t nb, const float* x, int64_t ldx, float* out) {
  __m256 a0[MT], a1[MT];
  for (int j = 0; j < MT; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block_step<F, MT>(qs + b * F::bytes_per_block, dv + b, x + b * QK, ldx, a0);
    block_step<F, MT>(qs + (b + 1) * F::bytes_per_block, dv + b + 1, x + (b + 1) * QK, ldx, a1);
  }
  if (b < nb) block_step<F, MT>(qs + b * F::bytes_per_block, dv + b, x + b * QK, ldx, a0);
  for (int j = 0; j < MT; ++j) out[j] = hsum(_mm256_add_ps(a0[j], a1[j]));
}

// One weight row rebuilt in fp32 (bit-exact: d * q is exact, so fma(q, d, m) = the dequantized value).
template <class F>
inline void dequant_row(const uint8_t* qs, const float* dv, const float* mv, int64_t nb, float* w) {
  for (int64_t b = 0; b < nb; ++b) {
    __m256 q[4];
    F::quants(qs + b * F::bytes_per_block, q);
    const __m256 vd = _mm256_broadcast_ss(dv + b);
    const __m256 vm = mv ? _mm256_broadcast_ss(mv + b) : _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(w + b * QK + 8 * i, _mm256_fmadd_ps(q[i], vd, vm));
  }
}

// NR dequantized weight rows (in L1) against MT rows of x: NR * MT accumulators, 8 floats of K per step.
template <int NR, int MT>
inline void dense_tile(const float* const* w, int64_t K, const float* x, float (*out)[4]) {
  __m256 acc[NR][MT];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MT; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = _mm256_loadu_ps(w[i] + k);
    for (int j = 0; j < MT; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + j * K + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MT; ++j) out[i][j] = hsum(acc[i][j]);
}

template <int NR>
inline void dense_rows(const float* const* w, int64_t K, const float* x, int64_t M, int64_t N, int64_t n,
                       const float* bp, float* y) {
  float out[NR][4];
  for (int64_t r = 0; r < M; r += 4) {
    const int mt = M - r >= 4 ? 4 : static_cast<int>(M - r);
    switch (mt) {
      case 4: dense_tile<NR, 4>(w, K, x + r * K, out); break;
      case 3: dense_tile<NR, 3>(w, K, x + r * K, out); break;
      case 2: dense_tile<NR, 2>(w, K, x + r * K, out); break;
      default: dense_tile<NR, 1>(w, K, x + r * K, out); break;
    }
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < mt; ++j) y[(r + j) * N + n + i] = out[i][j] + (bp ? bp[n + i] : 0.f);
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
  if (M >= DENSE_MIN_ROWS) {
    // small GEMM: rebuild two weight rows at a time in fp32 (L1), then a 2 x 4 register-blocked product
    at::parallel_for(0, N, ROW_CHUNK, [&](int64_t begin, int64_t end) {
      std::vector<float> dbuf(nb), mbuf(nb), wbuf(2 * K);
      float* w[2] = {wbuf.data(), wbuf.data() + K};
      for (int64_t n = begin; n < end; n += 2) {
        const int nr = end - n >= 2 ? 2 : 1;
        for (int i = 0; i < nr; ++i) {
          halves_to_floats(dp + (n + i) * nb, nb, dbuf.data());
          if (mp) halves_to_floats(mp + (n + i) * nb, nb, mbuf.data());
          dequant_row<F>(qp + (n + i) * qrow, dbuf.data(), mp ? mbuf.data() : nullptr, nb, w[i]);
        }
        if (nr == 2) dense_rows<2>(w, K, xp, M, N, n, bp, yp);
        else dense_rows<1>(w, K, xp, M, N, n, bp, yp);
      }
    });
    return y;
  }
  // GEMV / M < DENSE_MIN_ROWS: sum_b d_b (q_b . x_b) straight from the quants, + the m term
  // Q4_1's m term: sum_b m_b * (sum of x_j over block b), with the block sums of x computed once per call
  std::vector<float> xsum(mp ? M * nb : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i) {
    const float* xb = xp + i * QK;
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                             _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
    xsum[i] = hsum(s);
  }
  at::parallel_for(0, N, ROW_CHUNK, [&](int64_t begin, int64_t end) {
    std::vector<float> dbuf(nb), mbuf(nb);
    float out[4];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* q = qp + n * qrow;
      halves_to_floats(dp + n * nb, nb, dbuf.data());
      if (mp) halves_to_floats(mp + n * nb, nb, mbuf.data());
      const float bn = bp ? bp[n] : 0.f;
      for (int64_t r = 0; r < M;) {
        const int64_t left = M - r;
        const int mt = left >= 4 ? 4 : static_cast<int>(left);
        const float* xr = xp + r * K;
        switch (mt) {
          case 4: row_tile<F, 4>(q, dbuf.data(), nb, xr, K, out); break;
          case 3: row_tile<F, 3>(q, dbuf.data(), nb, xr, K, out); break;
          case 2: row_tile<F, 2>(q, dbuf.data(), nb, xr, K, out); break;
          default: row_tile<F, 1>(q, dbuf.data(), nb, xr, K, out); break;
        }
        for (int j = 0; j < mt; ++j) {
          float v = out[j] + bn;
          if (mp) v += dot(mbuf.data(), xsum.data() + (r + j) * nb, nb);
          yp[(r + j) * N + n] = v;
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

// ------------------------------------------------------------------------------------------------------
// Decode-step helpers (lean.py): each replaces several small ATen ops whose dispatch cost dominated a batch-1
// step once the Linear layers were fast. fp32, contiguous inputs.

// y = w * (x * rsqrt(mean(x^2) + eps)) per row of x (M, K): LlamaRMSNorm
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous fp32 (M, K)");
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous() && w.numel() == x.size(1), "w: fp32 (K,)");
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = xp + r * K;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, K) / static_cast<float>(K) + static_cast<float>(eps));
    for (int64_t k = 0; k < K; ++k) yp[r * K + k] = wp[k] * (xr[k] * inv);
  }
  return y;
}

// g (M, 2I) -> silu(g[:, :I]) * g[:, I:]: the gated MLP's activation
torch::Tensor silu_mul(const torch::Tensor& g) {
  TORCH_CHECK(g.dim() == 2 && g.scalar_type() == torch::kFloat && g.is_contiguous() && g.size(1) % 2 == 0,
              "g: contiguous fp32 (M, 2I)");
  const int64_t M = g.size(0), I = g.size(1) / 2;
  auto y = torch::empty({M, I}, g.options());
  const float* gp = g.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const float a = gp[r * 2 * I + i];
      yp[r * I + i] = a / (1.0f + std::exp(-a)) * gp[r * 2 * I + I + i];
    }
  return y;
}

// Attention of T new positions per row, fused with RoPE and the KV-cache write.
//   y (B*T, (Hq + 2 Hkv) * D): the fused q | k | v projections of the new positions (row b*T + t)
//   cos, sin (B*T, D): HF's rotary tables for those positions (rotate_half convention)
//   keys, values (B, Hkv, cap, D): buffers holding `length` positions; the T new ones are written after them
//   mask: empty, or (B, length + T) with 0 for padding keys
// Query t of row b sees keys j <= length + t that the mask allows; query head h reads key / value head
// h / (Hq / Hkv) (grouped-query attention, as HF's repeat_kv). Returns (B*T, Hq * D).
torch::Tensor attend(const torch::Tensor& y, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor keys,
                     torch::Tensor values, int64_t length, const torch::Tensor& mask, int64_t n_q, int64_t n_kv,
                     double scale) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == torch::kFloat && y.is_contiguous(), "y: contiguous fp32");
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() &&
              keys.scalar_type() == torch::kFloat, "keys / values: contiguous fp32 (B, Hkv, cap, D)");
  const int64_t B = keys.size(0), cap = keys.size(2), D = keys.size(3), half = D / 2;
  const int64_t T = y.size(0) / B;
  TORCH_CHECK(keys.size(1) == n_kv && y.size(0) == B * T && y.size(1) == (n_q + 2 * n_kv) * D, "y / keys shapes");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * T * D && sin.numel() == B * T * D &&
              cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat, "cos / sin: fp32 (B*T, D)");
  TORCH_CHECK(length + T <= cap, "KV buffer full: ", length + T, " > ", cap);
  const int64_t S = length + T;
  const int64_t* mp = nullptr;
  torch::Tensor m64;
  if (mask.numel()) {
    m64 = mask.to(torch::kLong).contiguous();
    TORCH_CHECK(m64.dim() == 2 && m64.size(0) == B && m64.size(1) == S, "mask: (B, length + T)");
    mp = m64.data_ptr<int64_t>();
  }
  const int64_t W = y.size(1), rep = n_q / n_kv;
  const float *yp = y.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kp = keys.data_ptr<float>(), *vp = values.data_ptr<float>();
  auto qrot = torch::empty({B * T, n_q * D}, y.options());
  float* qp = qrot.data_ptr<float>();
  auto rope = [&](const float* src, const float* c, const float* s, float* dst) {
    for (int64_t d = 0; d < half; ++d) dst[d] = src[d] * c[d] - src[d + half] * s[d];
    for (int64_t d = half; d < D; ++d) dst[d] = src[d] * c[d] + src[d - half] * s[d];
  };
  for (int64_t r = 0; r < B * T; ++r) {
    const int64_t b = r / T, t = r % T;
    const float *row = yp + r * W, *c = cp + r * D, *s = sp + r * D;
    for (int64_t h = 0; h < n_q; ++h) rope(row + h * D, c, s, qp + r * n_q * D + h * D);
    for (int64_t h = 0; h < n_kv; ++h) {
      const int64_t at = ((b * n_kv + h) * cap + length + t) * D;
      rope(row + (n_q + h) * D, c, s, kp + at);
      std::memcpy(vp + at, row + (n_q + n_kv + h) * D, D * sizeof(float));
    }
  }
  auto out = torch::empty({B * T, n_q * D}, y.options());
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * n_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / n_q, h = bh % n_q;
      const float* kb = kp + (b * n_kv + h / rep) * cap * D;
      const float* vb = vp + (b * n_kv + h / rep) * cap * D;
      for (int64_t t = 0; t < T; ++t) {
        const float* q = qp + (b * T + t) * n_q * D + h * D;
        const int64_t n = length + t + 1;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          p[j] = (mp && mp[b * S + j] == 0) ? -INFINITY : dot(q, kb + j * D, D) * sc;
          mx = std::max(mx, p[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          p[j] = p[j] == -INFINITY ? 0.f : std::exp(p[j] - mx);
          sum += p[j];
        }
        float* o = op + (b * T + t) * n_q * D + h * D;
        __m256 acc[8];
        const bool vec = D == 64;
        if (vec) {
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
          for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.f) continue;
            const __m256 pj = _mm256_set1_ps(p[j]);
            for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vb + j * D + 8 * i), acc[i]);
          }
          const __m256 inv = _mm256_set1_ps(1.0f / sum);
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(acc[i], inv));
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
          for (int64_t j = 0; j < n; ++j)
            for (int64_t d = 0; d < D; ++d) o[d] += p[j] * vb[j * D + d];
          for (int64_t d = 0; d < D; ++d) o[d] /= sum;
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("rms_norm", &rms_norm, "LlamaRMSNorm of the rows of x");
  mod.def("silu_mul", &silu_mul, "silu(g[:, :I]) * g[:, I:]");
  mod.def("attend", &attend, "RoPE + KV write + grouped-query attention of the new positions");
  mod.def("q4_1_mm", &q4_1_mm, "y = x @ dequant(Q4_1)^T + bias");
  mod.def("q8_0_mm", &q8_0_mm, "y = x @ dequant(Q8_0)^T + bias");
  mod.def("set_dense_min_rows", [](int64_t m) { DENSE_MIN_ROWS = m; }, "rows of x from which the dense path runs");
}
