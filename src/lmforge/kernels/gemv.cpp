// y = act(norm(x) @ W^T (+ bias)) (+ residual) for a few rows of x: the matrix-vector products of batch-1
// decoding, with the norm before them and the activation after them fused in; and (attention.h) the
// attention of one query over a sequence's cache; and for the batched forward and its backward, (fused.h) the
// SwiGLU, rotary and RMSNorm-backward passes and (causal.h) causal attention of short sequences.
//
// W is row-major (N, K) in fp32, bf16 or int8 (with a per-row fp32 scale); x is fp32 or bf16 (converted
// once to fp32, or for int8 weights rounded to int16 per block: see "int8 weights"). Every weight row is
// read exactly once for all M rows of x: fp32 R rows at a time so that each x vector loaded feeds R fused
// multiply-adds, bf16 and int8 one row after another; sums are kept in fp32 and rounded once at the end
// (round-to-nearest-even for bf16, as c10::BFloat16 does). Threads: at::parallel_for over output rows, i.e.
// torch's own intra-op pool. Built by lmforge/kernels/_build.py with -O2 -march=native.
//
// The entry points take raw addresses and sizes (lmforge/kernels/__init__.py checks every tensor first):
// plain Python C API and ATen/Parallel.h only, because torch/extension.h and pybind11 take minutes of
// compiling for a few hundred lines of kernel.
#include <Python.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// ---- an 8- or 16-wide float vector, or a scalar where the CPU has neither AVX2 nor AVX-512 ----
// wload(p, out) loads the next B * VW weights as B float vectors. bf16 comes as B = 2: one load of 2 * VW
// values gives the even ones by a 16-bit shift and the odd ones by masking the low half, so x is stored
// in blocks of [VW even | VW odd] entries for bf16 weights (see permute_x).
#if defined(__AVX512F__)
constexpr int VW = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline void wload(const float* p, vf* o) { o[0] = _mm512_loadu_ps(p); }
inline void wload(const int8_t* p, vf* o) {
  o[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline void wload(const uint16_t* p, vf* o) {
  const __m512i raw = _mm512_loadu_si512(p);
  o[0] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  o[1] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xffff0000u))));
}
#define LMF_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VW = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline void wload(const float* p, vf* o) { o[0] = _mm256_loadu_ps(p); }
inline void wload(const int8_t* p, vf* o) {
  o[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline void wload(const uint16_t* p, vf* o) {
  const __m256i raw = _mm256_loadu_si256((const __m256i*)p);
  o[0] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  o[1] = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xffff0000u))));
}
#define LMF_ISA "avx2"
#else
constexpr int VW = 1;
using vf = float;
inline vf vzero() { return 0.f; }
inline vf vload(const float* p) { return *p; }
inline float vfma(float a, float b, float c) { return a * b + c; }
inline float vadd(float a, float b) { return a + b; }
inline float vsum(float a) { return a; }
#define LMF_ISA "scalar"
#endif

inline float to_f32(float v) { return v; }
inline float to_f32(int8_t v) { return static_cast<float>(v); }
inline float to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// fp32 -> bf16 rounding to nearest even, NaN kept a (quiet) NaN: c10::BFloat16's rule.
inline uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#include "vmath.h"

template <typename T>
constexpr int vectors_per_load() { return std::is_same<T, uint16_t>::value ? 2 : 1; }

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
template <typename T>
inline void wload(const T* p, vf* o) {
  for (int b = 0; b < vectors_per_load<T>(); ++b) o[b] = to_f32(p[b]);
}
#endif

inline void lmf_prefetch(const void* p) {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
}

// The loops over u, r, m and b must be unrolled so that the sums live in registers (-O2 does not).
#define LMF_UNROLL _Pragma("GCC unroll 16")

// out[r * M + m] = dot(W[r], x[m]) for r < R, m < M: each weight vector loaded feeds M sums, each x
// vector R sums; U steps along K per iteration, each into its own sums (independent FMA chains).
template <typename T, int M, int R, int U>
inline void dot_rows(const float* x, int64_t K, const T* w, float* out) {
  constexpr int B = vectors_per_load<T>(), S = B * VW;  // weights per load
  vf acc[U][R][M];
  LMF_UNROLL for (int u = 0; u < U; ++u)
    LMF_UNROLL for (int r = 0; r < R; ++r)
      LMF_UNROLL for (int m = 0; m < M; ++m) acc[u][r][m] = vzero();
  // Blocks of R rows ahead to fetch: at least ~4 KiB ahead so short rows still hide the memory latency.
  const int64_t block = R * K, ahead = block * std::max<int64_t>(1, 4096 / (block * int64_t(sizeof(T))));
  int64_t k = 0;
  for (; k + U * S <= K; k += U * S) {
    // Fetch the same columns of rows further down (the hardware prefetcher alone follows R interleaved
    // streams of short rows poorly): once per 64-byte line; a prefetch past the end never faults.
    if (((k * int64_t(sizeof(T))) & 63) < int64_t(U * S * sizeof(T)))
      LMF_UNROLL for (int r = 0; r < R; ++r) lmf_prefetch(w + r * K + ahead + k);
    LMF_UNROLL for (int u = 0; u < U; ++u)
      LMF_UNROLL for (int r = 0; r < R; ++r) {
        vf wv[B];
        wload(w + r * K + k + u * S, wv);
        LMF_UNROLL for (int b = 0; b < B; ++b)
          LMF_UNROLL for (int m = 0; m < M; ++m)
            acc[u][r][m] = vfma(wv[b], vload(x + m * K + k + u * S + b * VW), acc[u][r][m]);
      }
  }
  for (; k + S <= K; k += S)
    LMF_UNROLL for (int r = 0; r < R; ++r) {
      vf wv[B];
      wload(w + r * K + k, wv);
      LMF_UNROLL for (int b = 0; b < B; ++b)
        LMF_UNROLL for (int m = 0; m < M; ++m) acc[0][r][m] = vfma(wv[b], vload(x + m * K + k + b * VW), acc[0][r][m]);
    }
  LMF_UNROLL for (int r = 0; r < R; ++r)
    LMF_UNROLL for (int m = 0; m < M; ++m) {
      LMF_UNROLL for (int u = 1; u < U; ++u) acc[0][r][m] = vadd(acc[0][r][m], acc[u][r][m]);
      float s = vsum(acc[0][r][m]);
      for (int64_t j = k; j < K; ++j) s += to_f32(w[r * K + j]) * x[m * K + j];  // the tail is in natural order
      out[r * M + m] = s;
    }
}

// x (M, K) as fp32 in the order dot_rows<T> reads it: natural, but for bf16 weights each full block of
// 2 * VW entries as [even entries | odd entries].
template <typename T, typename X>
void permute_x(const X* x, int64_t M, int64_t K, float* out) {
  constexpr int S = vectors_per_load<T>() * VW;
  for (int64_t m = 0; m < M; ++m) {
    const X* xm = x + m * K;
    float* om = out + m * K;
    int64_t k = 0;
    if (S > VW)
      for (; k + S <= K; k += S)
        for (int j = 0; j < VW; ++j) {
          om[k + j] = to_f32(xm[k + 2 * j]);
          om[k + VW + j] = to_f32(xm[k + 2 * j + 1]);
        }
    for (; k < K; ++k) om[k] = to_f32(xm[k]);
  }
}

// Rows per step and steps along K: enough independent sums (about 8) to hide the FMA latency, few enough
// to stay in the 16 vector registers of AVX2.
template <typename T, int M>
constexpr int rows_per_step() {
  return std::is_same<T, float>::value && M == 4 ? 3 : M <= 2 ? 4 : M <= 4 ? 2 : 1;
}
template <int M>
constexpr int unroll() { return M == 1 ? 2 : 1; }

struct Epilogue {
  const float* scale;    // (N,) or null
  const void* bias;      // (N,) fp32 or bf16, or null
  bool bias_bf16;
  const void* residual;  // (M, N) of the output dtype, or null
  void* y;               // (M, N) fp32 or bf16
  bool out_bf16;
  int64_t N;
  bool gelu;             // y = GELU(x W^T + b) (tanh form; no residual), applied per tile by `activate`

  // The epilogue of rows m0.. of this one (y and residual start m0 rows further).
  inline Epilogue shifted(int64_t m0) const {
    Epilogue e = *this;
    const int64_t size = out_bf16 ? 2 : 4;
    e.y = static_cast<char*>(y) + m0 * N * size;
    if (residual) e.residual = static_cast<const char*>(residual) + m0 * N * size;
    return e;
  }
  inline float load(const void* p, bool bf16, int64_t i) const {
    return bf16 ? to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  inline void store(int m, int64_t n, float v) const {
    if (scale) v *= scale[n];
    if (bias) v += load(bias, bias_bf16, n);
    const int64_t i = m * N + n;
    if (residual) v += load(residual, out_bf16, i);
    if (out_bf16)
      static_cast<uint16_t*>(y)[i] = to_bf16(v);
    else
      static_cast<float*>(y)[i] = v;
  }
};

// dot(w, x) for one row of x, the weight row read as one sequential stream of 64-byte lines, each into its
// own sums, one prefetch per line well ahead. For one row of x this streams faster than dot_rows'
// interleaved rows: bf16 1.15-1.2x on the 2-core Zen 3 EPYC (AVX2); fp32 1.11-1.17x on the 2-core Zen 4
// EPYC (AVX-512), but 0.96x on the Zen 3, where fp32 keeps dot_rows (seq_one_row).
template <typename T>
constexpr bool seq_one_row() {
  return std::is_same<T, uint16_t>::value || (std::is_same<T, float>::value && VW == 16);
}
// Lines per step: with AVX-512, one fp32 load is a whole line, so a step of two lines keeps two
// independent sums (1.0-1.2x over one line, same process, Zen 4); bf16 stays at one (0.88x with two).
template <typename T>
constexpr int seq_lines() { return sizeof(T) == 4 && VW == 16 ? 2 : 1; }

template <typename T>
inline float dot_row_seq(const float* x, int64_t K, const T* w) {
  constexpr int B = vectors_per_load<T>(), S = B * VW, LINE = 64 / int(sizeof(T)), PER_LINE = seq_lines<T>() * LINE,
                LOADS = PER_LINE / S;
  vf acc[LOADS][B];
  LMF_UNROLL for (int l = 0; l < LOADS; ++l)
    LMF_UNROLL for (int b = 0; b < B; ++b) acc[l][b] = vzero();
  const int64_t ahead = std::max<int64_t>(16384 / int64_t(sizeof(T)), K);
  int64_t k = 0;
  for (; k + PER_LINE <= K; k += PER_LINE) {
    LMF_UNROLL for (int l = 0; l < seq_lines<T>(); ++l) lmf_prefetch(w + ahead + k + l * LINE);
    LMF_UNROLL for (int l = 0; l < LOADS; ++l) {
      vf wv[B];
      wload(w + k + l * S, wv);
      LMF_UNROLL for (int b = 0; b < B; ++b) acc[l][b] = vfma(wv[b], vload(x + k + l * S + b * VW), acc[l][b]);
    }
  }
  for (; k + S <= K; k += S) {
    vf wv[B];
    wload(w + k, wv);
    LMF_UNROLL for (int b = 0; b < B; ++b) acc[0][b] = vfma(wv[b], vload(x + k + b * VW), acc[0][b]);
  }
  vf total = vzero();
  LMF_UNROLL for (int l = 0; l < LOADS; ++l)
    LMF_UNROLL for (int b = 0; b < B; ++b) total = vadd(total, acc[l][b]);
  float s = vsum(total);
  for (; k < K; ++k) s += to_f32(w[k]) * x[k];
  return s;
}

// Rows [n0, n1) of y for the M (<= 8) rows of x.
template <typename T, int M>
void gemv_range(const float* x, int64_t K, const T* w, int64_t n0, int64_t n1, const Epilogue& ep) {
  if (M == 1 && seq_one_row<T>()) {
    for (int64_t n = n0; n < n1; ++n) ep.store(0, n, dot_row_seq<T>(x, K, w + n * K));
    return;
  }
  constexpr int R = rows_per_step<T, M>(), U = unroll<M>();
  float out[R * M];
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    dot_rows<T, M, R, U>(x, K, w + n * K, out);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) ep.store(m, n + r, out[r * M + m]);
  }
  for (; n < n1; ++n) {
    dot_rows<T, M, 1, U * R>(x, K, w + n * K, out);
    for (int m = 0; m < M; ++m) ep.store(m, n, out[m]);
  }
}

template <typename T>
void gemv_rows(const float* x, int64_t M, int64_t K, const T* w, int64_t n0, int64_t n1, const Epilogue& ep) {
  if (std::is_same<T, float>::value && M > 4 && K > 1024) {
    // fp32 rows longer than 1024, 5-8 rows of x: 4 at a time (3 weight rows each, 12 sums), so that the
    // x rows in use stay in L1 (8 rows of 3072 floats are 96 KiB: each multiply-add then waited for L2);
    // the second pass reads the weight tile from L2. 1.3-1.5x faster at 8-64 rows of K = 3072.
    gemv_range<T, 4>(x, K, w, n0, n1, ep);
    return gemv_rows<T>(x + 4 * K, M - 4, K, w, n0, n1, ep.shifted(4));
  }
  switch (M) {
    case 1: return gemv_range<T, 1>(x, K, w, n0, n1, ep);
    case 2: return gemv_range<T, 2>(x, K, w, n0, n1, ep);
    case 3: return gemv_range<T, 3>(x, K, w, n0, n1, ep);
    case 4: return gemv_range<T, 4>(x, K, w, n0, n1, ep);
    case 5: return gemv_range<T, 5>(x, K, w, n0, n1, ep);
    case 6: return gemv_range<T, 6>(x, K, w, n0, n1, ep);
    case 7: return gemv_range<T, 7>(x, K, w, n0, n1, ep);
    default: return gemv_range<T, 8>(x, K, w, n0, n1, ep);
  }
}

// ---- int8 weights: integer products ----
// x is rounded to int16 in blocks of QB entries along K, each block with its own scale (its largest |x| /
// 32767): the rounding error, at most half a step (1/65534 of the block's largest entry), is far below the
// weights' own (half a step of 1/254 of the row's largest). Each block's int8 x int16 products are summed
// exactly in int32 (QB * 127 * 32767 < 2^31), then scaled by the block's scale and summed in fp32. On AVX2
// one multiply-add instruction (vpmaddwd) takes 16 weights, against 8 per fused multiply-add after a
// conversion to fp32: the products, not the memory, bounded the earlier fp32 path (llama.cpp's Q8_0 rounds
// x to int8 in blocks of 32 for the same reason; int16 keeps x's rounding negligible).
constexpr int64_t QB = 256;
constexpr float X_LEVELS = 32767.f;

struct QuantizedX {
  std::vector<int16_t> q;  // (M, K)
  std::vector<float> scale;  // (M, blocks)
  int64_t blocks;
};

// One row of x (fp32 or bf16) into int16 blocks; a block holding inf or NaN gets a NaN scale, so every
// output it reaches is NaN (as the float product would be inf or NaN).
template <typename X>
void quantize_row(const X* x, int64_t K, int16_t* q, float* scale) {
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += QB, ++b) {
    const int64_t k1 = std::min(K, k0 + QB);
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      const float v = to_f32(x[k]);
      finite &= std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    const float inv = (finite && amax > 0.f) ? X_LEVELS / amax : 0.f;
    scale[b] = finite ? amax / X_LEVELS : std::numeric_limits<float>::quiet_NaN();
    for (int64_t k = k0; k < k1; ++k) {
      const float v = std::nearbyint(to_f32(x[k]) * inv);
      q[k] = static_cast<int16_t>(std::min(X_LEVELS, std::max(-X_LEVELS, v)));
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
constexpr int QW = 16;  // int16 lanes of one step
using vi = __m256i;
inline vi izero() { return _mm256_setzero_si256(); }
inline vi iadd(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vi wload16(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
// acc + pairwise sums of w * x (16 int16 products into 8 int32 lanes), exact.
inline vi imadd(vi w, const int16_t* x, vi acc) {
  const vi xv = _mm256_loadu_si256((const __m256i*)x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, w, xv);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, w, xv);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, xv));
#endif
}
using vsf = __m256;  // the fp32 block sums
inline vsf szero() { return _mm256_setzero_ps(); }
inline vsf sfma(vi a, float s, vsf acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s), acc); }
inline vsf sfmaf(vsf a, float s, vsf acc) { return _mm256_fmadd_ps(a, _mm256_set1_ps(s), acc); }
inline vsf vadd_s(vsf a, vsf b) { return _mm256_add_ps(a, b); }
inline float ssum(vsf a) { return sum8(a); }
#else
constexpr int QW = 1;
using vi = int32_t;
inline vi izero() { return 0; }
inline vi iadd(vi a, vi b) { return a + b; }
inline vi wload16(const int8_t* p) { return *p; }
inline vi imadd(vi w, const int16_t* x, vi acc) { return acc + w * int32_t(*x); }
using vsf = float;
inline vsf szero() { return 0.f; }
inline vsf sfma(vi a, float s, vsf acc) { return float(a) * s + acc; }
inline vsf sfmaf(vsf a, float s, vsf acc) { return a * s + acc; }
inline vsf vadd_s(vsf a, vsf b) { return a + b; }
inline float ssum(vsf a) { return a; }
#endif

// out[m] = dot(w, x[m]) for m < M, in the blocks of QuantizedX. One weight row at a time, so the weights
// are read as one sequential stream (rows are short: interleaving several, as dot_rows does, left the
// hardware prefetcher behind); U steps of 16 per 64-byte line, each into its own sums.
template <int M, int U>
inline void dot_row_i8(const int16_t* xq, const float* xs, int64_t blocks, int64_t K, const int8_t* w, float* out) {
  vsf acc[M];
  float tail[M];
  LMF_UNROLL for (int m = 0; m < M; ++m) acc[m] = szero(), tail[m] = 0.f;
  constexpr int64_t LINE = 64;
  const int64_t ahead = std::max<int64_t>(16384, K);  // bytes: well past the memory latency
  for (int64_t b = 0, k0 = 0; b < blocks; ++b, k0 += QB) {
    const int64_t k1 = std::min(K, k0 + QB);
    vi iacc[U][M];
    LMF_UNROLL for (int u = 0; u < U; ++u)
      LMF_UNROLL for (int m = 0; m < M; ++m) iacc[u][m] = izero();
    int64_t k = k0;
    for (; k + LINE <= k1; k += LINE) {
      lmf_prefetch(w + ahead + k);
      LMF_UNROLL for (int j = 0; j < LINE / QW; ++j) {
        const vi wv = wload16(w + k + j * QW);
        LMF_UNROLL for (int m = 0; m < M; ++m) iacc[j % U][m] = imadd(wv, xq + m * K + k + j * QW, iacc[j % U][m]);
      }
    }
    for (; k + QW <= k1; k += QW) {
      const vi wv = wload16(w + k);
      LMF_UNROLL for (int m = 0; m < M; ++m) iacc[0][m] = imadd(wv, xq + m * K + k, iacc[0][m]);
    }
    LMF_UNROLL for (int m = 0; m < M; ++m) {
      LMF_UNROLL for (int u = 1; u < U; ++u) iacc[0][m] = iadd(iacc[0][m], iacc[u][m]);
      int32_t rest = 0;  // the row's last entries that fill no vector
      for (int64_t j = k; j < k1; ++j) rest += int32_t(w[j]) * xq[m * K + j];
      acc[m] = sfma(iacc[0][m], xs[m * blocks + b], acc[m]);
      tail[m] += float(rest) * xs[m * blocks + b];
    }
  }
  LMF_UNROLL for (int m = 0; m < M; ++m) out[m] = ssum(acc[m]) + tail[m];
}

template <int M>
constexpr int unroll_i8() { return M <= 2 ? 4 : M <= 4 ? 2 : 1; }

// Weights with a scale per group of G = 32 entries along K (an LM head's: see lmforge/quantize.py) instead
// of one per row: K is a multiple of G and G divides QB, so each group's integer sum (two steps of 16) is
// scaled by its weight scale into fp32 sums (two, alternating, to halve the dependency chain), and each
// block's sums by the block's x scale. No tail: every row is whole groups.
constexpr int64_t WG = 32;
static_assert(QB % WG == 0 && WG % (2 * QW) == 0, "a weight group is whole steps of an x block");

template <int M>
inline void dot_row_i8_grouped(const int16_t* xq, const float* xs, int64_t blocks, int64_t K, const int8_t* w,
                               const float* wscale, float* out) {
  vsf acc[M];
  LMF_UNROLL for (int m = 0; m < M; ++m) acc[m] = szero();
  const int64_t ahead = std::max<int64_t>(16384, K);
  for (int64_t b = 0, k0 = 0; b < blocks; ++b, k0 += QB) {
    const int64_t k1 = std::min(K, k0 + QB);
    vsf part[2][M];
    LMF_UNROLL for (int h = 0; h < 2; ++h)
      LMF_UNROLL for (int m = 0; m < M; ++m) part[h][m] = szero();
    int h = 0;
    for (int64_t g = k0; g < k1; g += WG, h ^= 1) {
      if ((g & 63) == 0) lmf_prefetch(w + ahead + g);
      vi iacc[M];
      LMF_UNROLL for (int m = 0; m < M; ++m) iacc[m] = izero();
      LMF_UNROLL for (int j = 0; j < WG / QW; ++j) {
        const vi wv = wload16(w + g + j * QW);
        LMF_UNROLL for (int m = 0; m < M; ++m) iacc[m] = imadd(wv, xq + m * K + g + j * QW, iacc[m]);
      }
      const float s = wscale[g / WG];
      LMF_UNROLL for (int m = 0; m < M; ++m) part[h][m] = sfma(iacc[m], s, part[h][m]);
    }
    LMF_UNROLL for (int m = 0; m < M; ++m) acc[m] = sfmaf(vadd_s(part[0][m], part[1][m]), xs[m * blocks + b], acc[m]);
  }
  LMF_UNROLL for (int m = 0; m < M; ++m) out[m] = ssum(acc[m]);
}

// Rows [n0, n1) of y for the M (<= 8) rows of x; `groups` (N, K / WG) holds the weights' group scales, or is
// null (the epilogue applies the per-row scale).
template <int M>
void gemv_range_i8(const int16_t* xq, const float* xs, int64_t blocks, int64_t K, const int8_t* w, const float* groups,
                   int64_t n0, int64_t n1, const Epilogue& ep) {
  float out[M];
  for (int64_t n = n0; n < n1; ++n) {
    if (groups)
      dot_row_i8_grouped<M>(xq, xs, blocks, K, w + n * K, groups + n * (K / WG), out);
    else
      dot_row_i8<M, unroll_i8<M>()>(xq, xs, blocks, K, w + n * K, out);
    for (int m = 0; m < M; ++m) ep.store(m, n, out[m]);
  }
}

// x rows [0, M) starting at xq / xs (M <= 8).
inline void gemv_rows_i8(const int16_t* xq, const float* xs, int64_t blocks, int64_t M, int64_t K, const int8_t* w,
                         const float* groups, int64_t n0, int64_t n1, const Epilogue& ep) {
  switch (M) {
    case 1: return gemv_range_i8<1>(xq, xs, blocks, K, w, groups, n0, n1, ep);
    case 2: return gemv_range_i8<2>(xq, xs, blocks, K, w, groups, n0, n1, ep);
    case 3: return gemv_range_i8<3>(xq, xs, blocks, K, w, groups, n0, n1, ep);
    case 4: return gemv_range_i8<4>(xq, xs, blocks, K, w, groups, n0, n1, ep);
    case 5: return gemv_range_i8<5>(xq, xs, blocks, K, w, groups, n0, n1, ep);
    case 6: return gemv_range_i8<6>(xq, xs, blocks, K, w, groups, n0, n1, ep);
    case 7: return gemv_range_i8<7>(xq, xs, blocks, K, w, groups, n0, n1, ep);
    default: return gemv_range_i8<8>(xq, xs, blocks, K, w, groups, n0, n1, ep);
  }
}

// Weight kinds and flags of the entry point (mirrored in lmforge/kernels/__init__.py).
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };
enum { X_BF16 = 1, BIAS_BF16 = 2, NORM_LAYERNORM = 4, NORM_RMSNORM = 8, ACT_GELU_TANH = 16, W_GROUPS_32 = 32 };

// The norm in front of a projection, fused into it: each row of x normalized in fp32 and rounded to x's
// dtype, as the separate module's output would be. LayerNorm: (x - mean) / sqrt(var + eps) * g + b;
// RMSNorm: round(x / sqrt(mean(x^2) + eps)) * g, the weight multiply in x's dtype (transformers' order).
// g and b have x's dtype. Sums in double: exact enough that only the final rounding remains.
struct Norm {
  int64_t kind;  // NORM_LAYERNORM, NORM_RMSNORM or 0 (none)
  const void* weight;  // (K,)
  const void* bias;    // (K,) or null (LayerNorm only)
  float eps;
};

template <typename X>
void normalize_rows(const X* x, int64_t M, int64_t K, const Norm& norm, float* out) {
  constexpr bool bf16 = std::is_same<X, uint16_t>::value;
  const X* g = static_cast<const X*>(norm.weight);
  const X* b = static_cast<const X*>(norm.bias);
  auto round = [](float v) { return bf16 ? to_f32(to_bf16(v)) : v; };
  for (int64_t m = 0; m < M; ++m) {
    const X* xm = x + m * K;
    float* om = out + m * K;
    if (norm.kind == NORM_LAYERNORM) {
      double sum = 0, squares = 0;
      for (int64_t k = 0; k < K; ++k) sum += to_f32(xm[k]);
      const double mean = sum / K;
      for (int64_t k = 0; k < K; ++k) squares += (to_f32(xm[k]) - mean) * (to_f32(xm[k]) - mean);
      const float rstd = float(1.0 / std::sqrt(squares / K + norm.eps)), meanf = float(mean);
      for (int64_t k = 0; k < K; ++k)
        om[k] = round((to_f32(xm[k]) - meanf) * rstd * to_f32(g[k]) + (b ? to_f32(b[k]) : 0.f));
    } else {
      double squares = 0;
      for (int64_t k = 0; k < K; ++k) squares += double(to_f32(xm[k])) * to_f32(xm[k]);
      const float r = float(1.0 / std::sqrt(squares / K + norm.eps));
      for (int64_t k = 0; k < K; ++k) om[k] = round(round(to_f32(xm[k]) * r) * to_f32(g[k]));
    }
  }
}

// y[m, n0:n1] = GELU(y[m, n0:n1]) for the tile a thread has just written (still in its cache).
inline void activate(const Epilogue& ep, int64_t rows, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < rows; ++m) {
    int64_t n = n0;
    if (ep.out_bf16) {
      uint16_t* y = static_cast<uint16_t*>(ep.y) + m * ep.N;
#if defined(__AVX2__) && defined(__FMA__)
      alignas(32) float tmp[8];
      for (; n + 8 <= n1; n += 8) {
        _mm256_store_ps(tmp, gelu_tanh(load8(y + n)));
        for (int j = 0; j < 8; ++j) y[n + j] = to_bf16(tmp[j]);
      }
#endif
      for (; n < n1; ++n) y[n] = to_bf16(gelu_tanh(to_f32(y[n])));
    } else {
      float* y = static_cast<float*>(ep.y) + m * ep.N;
#if defined(__AVX2__) && defined(__FMA__)
      for (; n + 8 <= n1; n += 8) _mm256_storeu_ps(y + n, gelu_tanh(_mm256_loadu_ps(y + n)));
#endif
      for (; n < n1; ++n) y[n] = gelu_tanh(y[n]);
    }
  }
}

// Split the weight rows among threads and call rows(m0, rows_of_x, n0, n1, epilogue) per block of 8 rows of
// x and tile of weight rows.
template <typename Rows>
void tiled(int64_t M, int64_t N, int64_t row_bytes, const Epilogue& ep, const Rows& rows) {
  const int64_t out_size = ep.out_bf16 ? 2 : 4;
  std::vector<Epilogue> blocks;  // one per 8 rows of x (each block's y and residual)
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    Epilogue block = ep;
    block.y = static_cast<char*>(ep.y) + m0 * N * out_size;
    if (ep.residual) block.residual = static_cast<const char*>(ep.residual) + m0 * N * out_size;
    blocks.push_back(block);
  }
  // Threads split the weight rows; each takes them in tiles of ~128 KiB that all blocks of 8 rows of x
  // use while the tile is in the core's L2 cache, so the weights come from memory once for all M rows.
  // (With one block there is nothing to reuse: one call per thread's range. Tiles are a multiple of 8
  // rows so that no tile ends in the kernel's slower one-row tail.)
  const int64_t tile = blocks.size() == 1 ? N : ((std::max<int64_t>(8, (int64_t(1) << 17) / std::max<int64_t>(1, row_bytes)) + 7) / 8) * 8;
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 16) / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += tile) {
      const int64_t n1 = std::min(end, n0 + tile);
      for (size_t b = 0; b < blocks.size(); ++b) {
        const int64_t m0 = int64_t(b) * 8;
        rows(m0, std::min<int64_t>(8, M - m0), n0, n1, blocks[b]);
        if (ep.gelu) activate(blocks[b], std::min<int64_t>(8, M - m0), n0, n1);
      }
    }
  });
}

// x normalized by `norm` into `buffer` (then fp32), or x itself.
inline const void* normalized(const void* x, bool& x_bf16, int64_t M, int64_t K, const Norm& norm,
                              std::vector<float>& buffer) {
  if (!norm.kind) return x;
  buffer.resize(M * K);
  if (x_bf16)
    normalize_rows(static_cast<const uint16_t*>(x), M, K, norm, buffer.data());
  else
    normalize_rows(static_cast<const float*>(x), M, K, norm, buffer.data());
  x_bf16 = false;  // rounded to bf16 already where x was bf16: the output keeps x's dtype (ep.out_bf16)
  return buffer.data();
}

template <typename T>
void run(const void* x, bool x_bf16, int64_t M, int64_t K, const T* w, int64_t N, const Epilogue& ep, const Norm& norm) {
  std::vector<float> normed, xbuf;
  x = normalized(x, x_bf16, M, K, norm, normed);
  const float* xf = static_cast<const float*>(x);
  if (x_bf16 || vectors_per_load<T>() > 1) {
    xbuf.resize(M * K);
    if (x_bf16)
      permute_x<T>(static_cast<const uint16_t*>(x), M, K, xbuf.data());
    else
      permute_x<T>(xf, M, K, xbuf.data());
    xf = xbuf.data();
  }
  tiled(M, N, K * int64_t(sizeof(T)), ep, [&](int64_t m0, int64_t m, int64_t n0, int64_t n1, const Epilogue& e) {
    gemv_rows<T>(xf + m0 * K, m, K, w, n0, n1, e);
  });
}

void run_i8(const void* x, bool x_bf16, int64_t M, int64_t K, const int8_t* w, const float* groups, int64_t N,
            const Epilogue& ep, const Norm& norm) {
  std::vector<float> normed;
  x = normalized(x, x_bf16, M, K, norm, normed);
  QuantizedX qx{std::vector<int16_t>(M * K), {}, (K + QB - 1) / QB};
  qx.scale.resize(M * qx.blocks);
  for (int64_t m = 0; m < M; ++m) {
    if (x_bf16)
      quantize_row(static_cast<const uint16_t*>(x) + m * K, K, qx.q.data() + m * K, qx.scale.data() + m * qx.blocks);
    else
      quantize_row(static_cast<const float*>(x) + m * K, K, qx.q.data() + m * K, qx.scale.data() + m * qx.blocks);
  }
  tiled(M, N, K, ep, [&](int64_t m0, int64_t m, int64_t n0, int64_t n1, const Epilogue& e) {
    gemv_rows_i8(qx.q.data() + m0 * K, qx.scale.data() + m0 * qx.blocks, qx.blocks, m, K, w, groups, n0, n1, e);
  });
}

// The entry points' arguments: n - 1 integers (addresses, sizes, flags) then one float (none where `last` is
// null: n integers); false with a Python error set when they do not parse.
bool parse_args(const char* name, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t n, int64_t* ints, double* last) {
  if (nargs != n) {
    PyErr_Format(PyExc_TypeError, "%s expects %zd arguments", name, n);
    return false;
  }
  const Py_ssize_t n_ints = last ? n - 1 : n;
  for (Py_ssize_t i = 0; i < n_ints; ++i) ints[i] = static_cast<int64_t>(PyLong_AsLongLong(args[i]));
  if (last) *last = PyFloat_AsDouble(args[n - 1]);
  return !PyErr_Occurred();
}

// work() with the GIL released (the kernels touch no Python object); a C++ exception becomes a RuntimeError.
template <typename Work>
PyObject* without_gil(const char* name, const Work& work) {
  bool failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    work();
  } catch (const std::exception&) {
    failed = true;
  }
  Py_END_ALLOW_THREADS
  if (failed) {
    PyErr_Format(PyExc_RuntimeError, "lmforge kernels: %s failed", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// gemv(kind, flags, x, w, scale, bias, residual, y, M, K, N, norm_weight, norm_bias, norm_eps): addresses as
// ints, 0 for "none". y (M, N) and residual have x's dtype; scale is fp32 for int8 weights: (N,), or with
// W_GROUPS_32 (N, K / 32) (K a multiple of 32); the norm's weight and bias (flags NORM_*) have x's dtype.
PyObject* gemv_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[13];
  double eps;
  if (!parse_args("gemv", args, nargs, 14, v, &eps)) return nullptr;
  const int64_t kind = v[0], flags = v[1], M = v[8], K = v[9], N = v[10];
  const void* x = reinterpret_cast<const void*>(v[2]);
  const void* w = reinterpret_cast<const void*>(v[3]);
  const bool x_bf16 = flags & X_BF16;
  Epilogue ep{reinterpret_cast<const float*>(v[4]), reinterpret_cast<const void*>(v[5]), bool(flags & BIAS_BF16),
              reinterpret_cast<const void*>(v[6]), reinterpret_cast<void*>(v[7]), x_bf16, N, bool(flags & ACT_GELU_TANH)};
  const Norm norm{flags & (NORM_LAYERNORM | NORM_RMSNORM), reinterpret_cast<const void*>(v[11]),
                  reinterpret_cast<const void*>(v[12]), float(eps)};
  const float* groups = nullptr;  // group scales are applied inside the products, not by the epilogue
  if (flags & W_GROUPS_32) {
    if (kind != W_I8 || K % WG) {
      PyErr_SetString(PyExc_ValueError, "gemv: group scales need int8 weights and K a multiple of 32");
      return nullptr;
    }
    groups = ep.scale;
    ep.scale = nullptr;
  }
  if (M <= 0 || N <= 0) Py_RETURN_NONE;
  return without_gil("gemv", [&] {
    if (kind == W_F32) run(x, x_bf16, M, K, static_cast<const float*>(w), N, ep, norm);
    else if (kind == W_BF16) run(x, x_bf16, M, K, static_cast<const uint16_t*>(w), N, ep, norm);
    else run_i8(x, x_bf16, M, K, static_cast<const int8_t*>(w), groups, N, ep, norm);
  });
}

#include "attention.h"

template <typename T>
void attend_addresses(const int64_t* v, float scale) {
  attend(reinterpret_cast<const T*>(v[1]), reinterpret_cast<T*>(v[2]), reinterpret_cast<T*>(v[3]),
         reinterpret_cast<const T*>(v[4]), reinterpret_cast<const T*>(v[5]), reinterpret_cast<T*>(v[6]), v[7], v[8],
         v[9], v[10], v[11], v[12], scale);
}

// attend(bf16, q, keys, values, k_new, v_new, y, H, KV, L, D, start, end, scale): addresses as ints (k_new and
// v_new 0 for "none"), scale a float.
PyObject* attend_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[13];
  double scale;
  if (!parse_args("attend", args, nargs, 14, v, &scale)) return nullptr;
  const int64_t H = v[7], KV = v[8], L = v[9], D = v[10], start = v[11], end = v[12];
  if (H <= 0 || KV <= 0 || H % KV || D <= 0 || start < 0 || end <= start || end > L || bool(v[4]) != bool(v[5])) {
    PyErr_SetString(PyExc_ValueError, "attend: bad sizes");
    return nullptr;
  }
  return without_gil("attend", [&] {
    if (v[0]) attend_addresses<uint16_t>(v, float(scale));
    else attend_addresses<float>(v, float(scale));
  });
}

#include "fused.h"
#include "causal.h"

#if LMF_CAUSAL
// causal(backward, q, k, v, y, lse, dy, dq, dk, dv, B, T, H, KV, D, scale): addresses as ints (dy, dq, dk, dv 0
// in the forward), scale a float; see causal.h (AVX2 builds only: lmforge.kernels.fused checks for `causal`).
PyObject* causal_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[15];
  double scale;
  if (!parse_args("causal", args, nargs, 16, v, &scale)) return nullptr;
  const Causal a{reinterpret_cast<const float*>(v[1]), reinterpret_cast<const float*>(v[2]),
                 reinterpret_cast<const float*>(v[3]), reinterpret_cast<float*>(v[4]), reinterpret_cast<float*>(v[5]),
                 reinterpret_cast<const float*>(v[6]), reinterpret_cast<float*>(v[7]), reinterpret_cast<float*>(v[8]),
                 reinterpret_cast<float*>(v[9]), v[10], v[11], v[12], v[13], v[14], float(scale)};
  if (a.H <= 0 || a.KV <= 0 || a.H % a.KV || a.D <= 0 || a.D % 8 || a.D > 128 ||
      (v[0] && !(a.dy && a.dq && a.dk && a.dv))) {
    PyErr_SetString(PyExc_ValueError, "causal: bad sizes");
    return nullptr;
  }
  if (a.B <= 0 || a.T <= 0) Py_RETURN_NONE;
  return without_gil("causal", [&] { causal_dispatch<1>(v[0], a); });
}
#endif

// swiglu(backward, h, dy, out, rows, I): addresses as ints (dy 0 in the forward); see fused.h.
PyObject* swiglu_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[6];
  if (!parse_args("swiglu", args, nargs, 6, v, nullptr)) return nullptr;
  if (v[4] <= 0 || v[5] <= 0) Py_RETURN_NONE;
  return without_gil("swiglu", [&] {
    swiglu(v[0], reinterpret_cast<const float*>(v[1]), reinterpret_cast<const float*>(v[2]), reinterpret_cast<float*>(v[3]),
           v[4], v[5]);
  });
}

// rmsnorm_backward(x, w, dy, dx, dw, rows, C, eps): addresses as ints, eps a float; see fused.h.
PyObject* rmsnorm_backward_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[7];
  double eps;
  if (!parse_args("rmsnorm_backward", args, nargs, 8, v, &eps)) return nullptr;
  if (v[5] <= 0 || v[6] <= 0) Py_RETURN_NONE;
  return without_gil("rmsnorm_backward", [&] {
    rmsnorm_backward(reinterpret_cast<const float*>(v[0]), reinterpret_cast<const float*>(v[1]),
                     reinterpret_cast<const float*>(v[2]), reinterpret_cast<float*>(v[3]), reinterpret_cast<float*>(v[4]),
                     v[5], v[6], float(eps));
  });
}

// heads(backward, qkv, q, k, v, cos, sin, B, T, H, KV, D, cos_batches): addresses as ints; see fused.h.
PyObject* heads_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[13];
  if (!parse_args("heads", args, nargs, 13, v, nullptr)) return nullptr;
  const Heads p{reinterpret_cast<float*>(v[1]), reinterpret_cast<float*>(v[2]), reinterpret_cast<float*>(v[3]),
                reinterpret_cast<float*>(v[4]), reinterpret_cast<const float*>(v[5]), reinterpret_cast<const float*>(v[6]),
                v[7], v[8], v[9], v[10], v[11], v[12]};
  if (p.H <= 0 || p.KV <= 0 || p.D <= 0 || p.D % 2 || !p.cos || !p.sin || (p.cos_batches != 1 && p.cos_batches != p.B)) {
    PyErr_SetString(PyExc_ValueError, "heads: bad sizes");
    return nullptr;
  }
  if (p.B <= 0 || p.T <= 0) Py_RETURN_NONE;
  return without_gil("heads", [&] { heads(v[0], p); });
}

PyMethodDef methods[] = {
    {"gemv", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(gemv_entry)), METH_FASTCALL,
     "gemv(kind, flags, x, w, scale, bias, residual, y, M, K, N, norm_weight, norm_bias, norm_eps)"},
    {"attend", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(attend_entry)), METH_FASTCALL,
     "attend(bf16, q, keys, values, k_new, v_new, y, H, KV, L, D, start, end, scale)"},
#if LMF_CAUSAL
    {"causal", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(causal_entry)), METH_FASTCALL,
     "causal(backward, q, k, v, y, lse, dy, dq, dk, dv, B, T, H, KV, D, scale)"},
#endif
    {"swiglu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(swiglu_entry)), METH_FASTCALL,
     "swiglu(backward, h, dy, out, rows, I)"},
    {"rmsnorm_backward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(rmsnorm_backward_entry)),
     METH_FASTCALL, "rmsnorm_backward(x, w, dy, dx, dw, rows, C, eps)"},
    {"heads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(heads_entry)), METH_FASTCALL,
     "heads(backward, qkv, q, k, v, cos, sin, B, T, H, KV, D, cos_batches)"},
    {nullptr, nullptr, 0, nullptr}};

#define LMF_STR2(a) #a
#define LMF_STR(a) LMF_STR2(a)
#define LMF_CAT2(a, b) a##b
#define LMF_CAT(a, b) LMF_CAT2(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, LMF_STR(TORCH_EXTENSION_NAME), "lmforge CPU kernels: gemv, one-query attention, fused training passes, causal attention", -1, methods};

}  // namespace

PyMODINIT_FUNC LMF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && PyModule_AddStringConstant(m, "isa", LMF_ISA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
