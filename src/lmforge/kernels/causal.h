// Causal self-attention of whole short sequences, forward and backward (training steps), fp32, AVX2:
// y_i = sum_{j <= i} softmax_j(scale q_i . k_j) v_j per head.
//
// q, dq (B, H, T, D); k, v, dk, dv (B, KV, T, D); y, dy (B, T, H, D), the layout the output projection reads
// and writes; lse (B, H, T), each query's log-sum-exp, kept by the forward so that the backward recomputes
// the probabilities p_ij = exp(scale q_i . k_j - lse_i) rather than storing them (as flash attention does).
// PyTorch's flash kernel is blocked for long sequences; at a training step's few dozen positions its fixed
// costs dominate. Here a head's keys (and values) are transposed once into a small buffer; scores come
// four queries x 8 keys at a time as whole-vector multiply-adds, over the j <= i half only; and every
// weighted sum of rows (y, dq over keys; dk, dv over queries) keeps several rows' sums in registers.
// D is a multiple of 8 up to 128. Part of gemv.cpp's translation unit (vmath.h's exponential).
#if defined(__AVX2__) && defined(__FMA__)
#define LMF_CAUSAL 1
// Loops over a template's NR rows and NV vectors unrolled, so that their sums live in registers (-O2 alone
// leaves them in memory).
#if defined(__clang__)
#define LMF_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LMF_UNROLL _Pragma("GCC unroll 16")
#else
#define LMF_UNROLL
#endif

struct Causal {
  const float* q;
  const float* k;
  const float* v;
  float* y;
  float* lse;
  const float* dy;
  float* dq;
  float* dk;
  float* dv;
  int64_t B, T, H, KV, D;
  float scale;
};

// rows (T, D) -> out (D, Tp), zero beyond T.
inline void transpose_rows(const float* rows, int64_t T, int64_t D, int64_t Tp, float* out) {
  std::fill(out, out + D * Tp, 0.f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) out[d * Tp + t] = rows[t * D + d];
}

// s[r][0, n) = scale * (x_r . column j of xt) for NR rows x_r (stride x_stride), n rounded up to 8; s rows
// have stride Tp like xt (D, Tp).
template <int NR>
inline void scores(const float* x, int64_t x_stride, const float* xt, int64_t D, int64_t Tp, int64_t n, float scale,
                   float* s) {
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 8) {
    __m256 acc[NR];
    LMF_UNROLL
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 kd = _mm256_loadu_ps(xt + d * Tp + j);
      LMF_UNROLL
      for (int r = 0; r < NR; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * x_stride + d]), kd, acc[r]);
    }
    LMF_UNROLL
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(s + r * Tp + j, _mm256_mul_ps(acc[r], scale8));
  }
}

// out_r (+)= alpha * sum_{j in [j0, j1)} w[r * w_row + j * w_elem] * m_j for NR rows r, m_j = m + j * m_stride
// (NV vectors), out_r = out + r * out_stride.
template <int NR, int NV>
inline void weighted_rows(const float* w, int64_t w_row, int64_t w_elem, const float* m, int64_t m_stride, int64_t j0,
                          int64_t j1, float alpha, bool accumulate, float* out, int64_t out_stride) {
  __m256 acc[NR][NV];
  LMF_UNROLL
  for (int r = 0; r < NR; ++r)
    LMF_UNROLL
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    __m256 mj[NV];
    LMF_UNROLL
    for (int u = 0; u < NV; ++u) mj[u] = _mm256_loadu_ps(m + j * m_stride + 8 * u);
    LMF_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m256 wr = _mm256_set1_ps(w[r * w_row + j * w_elem]);
      LMF_UNROLL
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm256_fmadd_ps(wr, mj[u], acc[r][u]);
    }
  }
  const __m256 alpha8 = _mm256_set1_ps(alpha);
  LMF_UNROLL
  for (int r = 0; r < NR; ++r)
    LMF_UNROLL
    for (int u = 0; u < NV; ++u) {
      float* o = out + r * out_stride + 8 * u;
      const __m256 x = _mm256_mul_ps(acc[r][u], alpha8);
      _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(x, _mm256_loadu_ps(o)) : x);
    }
}

// How many rows weighted_rows keeps at once: its NR x NV sums, NV loaded vectors and a broadcast in 16
// registers.
template <int NV>
constexpr int rows_at_once() {
  return NV <= 2 ? 4 : NV <= 4 ? 2 : 1;
}

// weighted_rows over `rows` rows (any count), rows_at_once at a time.
template <int NV>
inline void weighted_rows_n(int64_t rows, const float* w, int64_t w_row, int64_t w_elem, const float* m,
                            int64_t m_stride, int64_t j0, int64_t j1, float alpha, bool accumulate, float* out,
                            int64_t out_stride) {
  constexpr int NR = rows_at_once<NV>();
  int64_t r = 0;
  for (; r + NR <= rows; r += NR)
    weighted_rows<NR, NV>(w + r * w_row, w_row, w_elem, m, m_stride, j0, j1, alpha, accumulate, out + r * out_stride,
                          out_stride);
  for (; r < rows; ++r)
    weighted_rows<1, NV>(w + r * w_row, w_row, w_elem, m, m_stride, j0, j1, alpha, accumulate, out + r * out_stride,
                         out_stride);
}

// Scores of `rows` (<= 4) consecutive queries i0.. against keys [0, i0 + rows) into s (stride Tp).
inline void score_block(int64_t rows, const float* x, int64_t x_stride, const float* xt, int64_t D, int64_t Tp,
                        int64_t n, float scale, float* s) {
  if (rows == 4) scores<4>(x, x_stride, xt, D, Tp, n, scale, s);
  else
    for (int64_t r = 0; r < rows; ++r) scores<1>(x + r * x_stride, x_stride, xt, D, Tp, n, scale, s + r * Tp);
}

// Row r of a block: s becomes softmax(s) over its n_r = i0 + r + 1 keys, zero over [n_r, n) (so that the block's
// weighted sums run over n keys for every row); returns the log-sum-exp.
inline float softmax_row(float* s, int64_t n_r, int64_t n) {
  __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n_r; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float top = lanes[0];
  for (int u = 1; u < 8; ++u) top = std::max(top, lanes[u]);
  for (; j < n_r; ++j) top = std::max(top, s[j]);
  if (!std::isfinite(top)) top = 0.f;
  __m256 total8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n_r; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(top)));
    _mm256_storeu_ps(s + j, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = sum8(total8);
  for (; j < n_r; ++j) total += (s[j] = std::exp(s[j] - top));
  std::fill(s + n_r, s + n, 0.f);
  const float inv = 1.f / total;
  for (j = 0; j + 8 <= n_r; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(inv)));
  for (; j < n_r; ++j) s[j] *= inv;
  return top + std::log(total);
}

template <int NV>
void causal_forward(const Causal& a) {
  constexpr int64_t D = 8 * NV;
  const int64_t T = a.T, Tp = (T + 7) / 8 * 8, group = a.H / a.KV, y_stride = a.H * D;
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> kt(D * Tp), s(4 * Tp);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / a.H, h = p % a.H, kv = (b * a.KV + h / group) * T * D;
      if (p == p0 || h % group == 0) transpose_rows(a.k + kv, T, D, Tp, kt.data());
      for (int64_t i0 = 0; i0 < T; i0 += 4) {
        const int64_t rows = std::min<int64_t>(4, T - i0), n = i0 + rows;
        score_block(rows, a.q + (p * T + i0) * D, D, kt.data(), D, Tp, n, a.scale, s.data());
        for (int64_t r = 0; r < rows; ++r) a.lse[p * T + i0 + r] = softmax_row(s.data() + r * Tp, i0 + r + 1, n);
        weighted_rows_n<NV>(rows, s.data(), Tp, 1, a.v + kv, D, 0, n, 1.f, false,
                            a.y + ((b * T + i0) * a.H + h) * D, y_stride);
      }
    }
  });
}

// Per key/value head (its query heads in turn, so that dk and dv have one writer). With D_i = dy_i . y_i,
// dp_ij = dy_i . v_j and ds_ij = p_ij (dp_ij - D_i): dq_i = scale sum_j ds_ij k_j, dk_j = scale sum_i ds_ij q_i,
// dv_j = sum_i p_ij dy_i. Rows of P and dS (zero past the diagonal) go to (T, Tp) buffers first; dk and dv
// then sum down their columns.
template <int NV>
void causal_backward(const Causal& a) {
  constexpr int64_t D = 8 * NV;
  const int64_t T = a.T, Tp = (T + 7) / 8 * 8, group = a.H / a.KV, y_stride = a.H * D;
  at::parallel_for(0, a.B * a.KV, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> kt(D * Tp), vt(D * Tp), P(T * Tp), dS(T * Tp);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / a.KV;
      const float* k = a.k + g * T * D;
      const float* v = a.v + g * T * D;
      transpose_rows(k, T, D, Tp, kt.data());
      transpose_rows(v, T, D, Tp, vt.data());
      for (int64_t h = (g % a.KV) * group; h < (g % a.KV + 1) * group; ++h) {
        const int64_t head = b * a.H + h;
        const float* q = a.q + head * T * D;
        const float* dy = a.dy + (b * T * a.H + h) * D;  // row i at dy + i * y_stride
        const float* y = a.y + (b * T * a.H + h) * D;
        for (int64_t i0 = 0; i0 < T; i0 += 4) {
          const int64_t rows = std::min<int64_t>(4, T - i0), n = i0 + rows, n8 = (n + 7) / 8 * 8;
          float* p = P.data() + i0 * Tp;
          float* ds = dS.data() + i0 * Tp;
          score_block(rows, q + i0 * D, D, kt.data(), D, Tp, n, a.scale, p);
          score_block(rows, dy + i0 * y_stride, y_stride, vt.data(), D, Tp, n, 1.f, ds);  // dp, then ds in place
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r;
            __m256 di8 = _mm256_setzero_ps();
            LMF_UNROLL
            for (int u = 0; u < NV; ++u)
              di8 = _mm256_fmadd_ps(_mm256_loadu_ps(dy + i * y_stride + 8 * u), _mm256_loadu_ps(y + i * y_stride + 8 * u),
                                    di8);
            const __m256 di = _mm256_set1_ps(sum8(di8)), lse = _mm256_set1_ps(a.lse[head * T + i]);
            float* pr = p + r * Tp;
            float* dsr = ds + r * Tp;
            for (int64_t j = 0; j < n8; j += 8) {
              // p <= 1 up to rounding: the exponent is clamped at 0; keys past i get 0
              const __m256 x = _mm256_min_ps(_mm256_sub_ps(_mm256_loadu_ps(pr + j), lse), _mm256_setzero_ps());
              __m256 e = exp_nonpositive(x);
              if (j + 8 > i + 1) {
                alignas(32) float keep[8];
                for (int u = 0; u < 8; ++u) keep[u] = j + u <= i ? 1.f : 0.f;
                e = _mm256_mul_ps(e, _mm256_load_ps(keep));
              }
              _mm256_storeu_ps(pr + j, e);
              _mm256_storeu_ps(dsr + j, _mm256_mul_ps(e, _mm256_sub_ps(_mm256_loadu_ps(dsr + j), di)));
            }
            std::fill(pr + n8, pr + Tp, 0.f);
            std::fill(dsr + n8, dsr + Tp, 0.f);
          }
          weighted_rows_n<NV>(rows, ds, Tp, 1, k, D, 0, n, a.scale, false, a.dq + (head * T + i0) * D, D);
        }
        // dk_j, dv_j: sums over queries i >= j of the columns of dS and P (the first query head sets them)
        const bool first = h == (g % a.KV) * group;
        constexpr int NC = rows_at_once<NV>();
        for (int64_t j0 = 0; j0 < T; j0 += NC) {
          const int64_t cols = std::min<int64_t>(NC, T - j0);
          weighted_rows_n<NV>(cols, dS.data() + j0, 1, Tp, q, D, j0, T, a.scale, !first, a.dk + (g * T + j0) * D, D);
          weighted_rows_n<NV>(cols, P.data() + j0, 1, Tp, dy, y_stride, j0, T, 1.f, !first, a.dv + (g * T + j0) * D, D);
        }
      }
    }
  });
}

template <int NV>
void causal_dispatch(bool backward, const Causal& a) {
  if constexpr (NV > 16) {
    (void)backward, (void)a;
  } else if (a.D == 8 * NV) {
    if (backward) causal_backward<NV>(a);
    else causal_forward<NV>(a);
  } else {
    causal_dispatch<NV + 1>(backward, a);
  }
}
#endif
