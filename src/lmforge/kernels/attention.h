// Attention of one query per head over a sequence's cached keys and values: the attention of a batch-1
// decode step, y_h = sum_t softmax_t(scale * q_h . k_t) v_t for t in [start, end).
//
// PyTorch's fused CPU kernel (flash attention) costs 100-200 us per call here whatever the length, a
// blocked algorithm sized for long queries; for one query the work is a dot product and a weighted sum
// per cached position, read once. Sums and the softmax are in fp32 (the max subtracted first, as SDPA
// does), the output rounded once to the cache's dtype. Heads split among threads when there is enough
// work. Part of gemv.cpp's translation unit (it uses its conversions and vector width).

// e^x for x <= 0 (Cephes' expf: a degree-5 polynomial on [-ln2/2, ln2/2] times 2^n, about 1 ulp); 0 for
// x below -87 (where e^x leaves the normal floats).
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
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
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

// 8 entries of a key or value row as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline float sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// One head: q (D) fp32, keys/values rows t of length D (row stride D), scores a buffer of end - start.
template <typename T>
void attend_head(const float* q, const T* keys, const T* values, int64_t start, int64_t end, int64_t D, float scale,
                 float* scores, float* acc, T* y) {
  const int64_t n = end - start;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    const T* k = keys + (start + t) * D;
    float s = 0.f;
    int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 s8 = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8) s8 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), s8);
    s = sum8(s8);
#endif
    for (; d < D; ++d) s += q[d] * to_f32(k[d]);
    scores[t] = s * scale;
    top = std::max(top, scores[t]);
  }
  if (!std::isfinite(top)) top = 0.f;  // all -inf or a NaN: let the NaN / zero weights through unchanged
  float total = 0.f;
  int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 total8 = _mm256_setzero_ps();
  const __m256 top8 = _mm256_set1_ps(top);
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t), top8));
    _mm256_storeu_ps(scores + t, e);
    total8 = _mm256_add_ps(total8, e);
  }
  total = sum8(total8);
#endif
  for (; t < n; ++t) {
    scores[t] = std::exp(scores[t] - top);
    total += scores[t];
  }
  std::fill(acc, acc + D, 0.f);
  for (t = 0; t < n; ++t) {
    const T* v = values + (start + t) * D;
    const float p = scores[t];
    int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 p8 = _mm256_set1_ps(p);
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(p8, load8(v + d), _mm256_loadu_ps(acc + d)));
#endif
    for (; d < D; ++d) acc[d] += p * to_f32(v[d]);
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < D; ++d) {
    if constexpr (std::is_same<T, uint16_t>::value)
      y[d] = to_bf16(acc[d] * inv);
    else
      y[d] = acc[d] * inv;
  }
}

// q (H, D), y (H, D), keys/values (KV, L, D), all of dtype T; head h reads kv head h / (H / KV).
template <typename T>
void attend(const T* q, const T* keys, const T* values, T* y, int64_t H, int64_t KV, int64_t L, int64_t D,
            int64_t start, int64_t end, float scale) {
  const int64_t n = end - start, group = H / KV;
  // Below ~64K multiply-adds a second thread costs more to wake than it saves.
  const int64_t grain = H * n * D < (int64_t(1) << 16) ? H : 1;
  at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> buffer(n + 2 * D);
    float* scores = buffer.data();
    float* qf = scores + n;
    float* acc = qf + D;
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t d = 0; d < D; ++d) qf[d] = to_f32(q[h * D + d]);
      const int64_t g = h / group;
      attend_head(qf, keys + g * L * D, values + g * L * D, start, end, D, scale, scores, acc, y + h * D);
    }
  });
}
