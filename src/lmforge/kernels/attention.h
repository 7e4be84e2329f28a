// Attention of one query per head over a sequence's cached keys and values: the attention of a batch-1
// decode step, y_h = sum_t softmax_t(scale * q_h . k_t) v_t for t in [start, end).
//
// PyTorch's fused CPU kernel (flash attention) costs 100-200 us per call here whatever the length, a
// blocked algorithm sized for long queries; for one query the work is a dot product and a weighted sum
// per cached position, read once. Sums and the softmax are in fp32 (the max subtracted first, as SDPA
// does), the output rounded once to the cache's dtype. Heads split among threads when there is enough
// work. Part of gemv.cpp's translation unit (its conversions, vmath.h's exponential).

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

// q (H, D), y (H, D), keys/values (KV, L, D), all of dtype T; head h reads kv head h / (H / KV). The new
// token's key and value (KV, D each), when given, are first written at position end - 1.
template <typename T>
void attend(const T* q, T* keys, T* values, const T* k_new, const T* v_new, T* y, int64_t H, int64_t KV, int64_t L,
            int64_t D, int64_t start, int64_t end, float scale) {
  for (int64_t g = 0; k_new && g < KV; ++g) {
    std::memcpy(keys + (g * L + end - 1) * D, k_new + g * D, D * sizeof(T));
    std::memcpy(values + (g * L + end - 1) * D, v_new + g * D, D * sizeof(T));
  }
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
