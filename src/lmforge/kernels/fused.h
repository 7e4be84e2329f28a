// Fused elementwise passes of the batched forward and of its backward (training, prefill), fp32: the SwiGLU
// product of the gated MLP, the split of the fused [Q | K | V] projection into heads with rotary positions,
// and RMSNorm's backward. In torch each is four to ten kernels over the same memory, and the backward of
// the first two adds a concatenation of the pieces' gradients; on a small model these passes cost as much
// as the matrix products around them (llama-baby: 4-6 ms of a ~70 ms training step each). Here each is
// one pass, rows split among torch's threads. Part of gemv.cpp's translation unit (vmath.h's exponential).

// sigmoid(g) = 1 / (1 + e^-g), from e^-|g| so that the exponential never overflows.
inline float sigmoid(float g) {
  const float e = std::exp(-std::fabs(g));
  return (g >= 0.f ? 1.f : e) / (1.f + e);
}
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 sigmoid(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp_nonpositive(_mm256_or_ps(g, _mm256_set1_ps(-0.f)));  // e^-|g|
  return _mm256_div_ps(_mm256_blendv_ps(one, e, g), _mm256_add_ps(one, e));  // g < 0: e / (1 + e)
}
#endif

// Rows of h = [gate | up] (2I wide). Forward: y = silu(gate) * up (I wide). Backward, from dy: dh = [dy * up *
// silu'(gate) | dy * silu(gate)], with silu'(g) = s (1 + g (1 - s)), s = sigmoid(g) (as torch's silu_backward).
inline void swiglu_row(bool backward, const float* h, const float* dy, float* out, int64_t I) {
  const float* gate = h;
  const float* up = h + I;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= I; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i), u = _mm256_loadu_ps(up + i), s = sigmoid(g);
    const __m256 silu = _mm256_mul_ps(g, s);
    if (!backward) {
      _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, u));
      continue;
    }
    const __m256 d = _mm256_loadu_ps(dy + i);
    const __m256 slope = _mm256_mul_ps(s, _mm256_add_ps(one, _mm256_mul_ps(g, _mm256_sub_ps(one, s))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(d, u), slope));
    _mm256_storeu_ps(out + I + i, _mm256_mul_ps(d, silu));
  }
#endif
  for (; i < I; ++i) {
    const float g = gate[i], s = sigmoid(g), silu = g * s;
    if (!backward) {
      out[i] = silu * up[i];
      continue;
    }
    out[i] = dy[i] * up[i] * (s * (1.f + g * (1.f - s)));
    out[I + i] = dy[i] * silu;
  }
}

void swiglu(bool backward, const float* h, const float* dy, float* out, int64_t rows, int64_t I) {
  const int64_t width = backward ? 2 * I : I;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, I)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      swiglu_row(backward, h + r * 2 * I, dy ? dy + r * I : nullptr, out + r * width, I);
  });
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")  // the products rounded before the sum, as below
#endif
// One head's D values rotated by its position's angles, the half-split convention (pairs (d, d + D/2)):
// forward y = x cos + rotate_half(x) sin with rotate_half(x) = [-x2, x1]; backward (the transpose, i.e. the
// rotation back) dx = dy cos + [dy2 sin2, -dy1 sin1]. Each product is rounded before the sum, as torch's
// separate kernels round them, so both give the same bits.
inline void rotate_head(bool backward, const float* x, const float* cos, const float* sin, float* y, int64_t D) {
  const int64_t half = D / 2;
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; d + 8 <= half; d += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + d), x2 = _mm256_loadu_ps(x + half + d);
    const __m256 c1 = _mm256_loadu_ps(cos + d), c2 = _mm256_loadu_ps(cos + half + d);
    const __m256 s1 = _mm256_loadu_ps(sin + d), s2 = _mm256_loadu_ps(sin + half + d);
    if (backward) {
      _mm256_storeu_ps(y + d, _mm256_add_ps(_mm256_mul_ps(x1, c1), _mm256_mul_ps(x2, s2)));
      _mm256_storeu_ps(y + half + d, _mm256_sub_ps(_mm256_mul_ps(x2, c2), _mm256_mul_ps(x1, s1)));
    } else {
      _mm256_storeu_ps(y + d, _mm256_sub_ps(_mm256_mul_ps(x1, c1), _mm256_mul_ps(x2, s1)));
      _mm256_storeu_ps(y + half + d, _mm256_add_ps(_mm256_mul_ps(x2, c2), _mm256_mul_ps(x1, s2)));
    }
  }
#endif
  for (; d < half; ++d) {
    const float x1 = x[d], x2 = x[half + d];
    const float a1 = x1 * cos[d], a2 = x2 * cos[half + d];
    if (backward) {
      const float b1 = x2 * sin[half + d], b2 = x1 * sin[d];
      y[d] = a1 + b1;
      y[half + d] = a2 - b2;
    } else {
      const float b1 = x2 * sin[d], b2 = x1 * sin[half + d];
      y[d] = a1 - b1;
      y[half + d] = a2 + b2;
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// The projected heads of B x T positions, qkv (B, T, H + 2 KV, D), against q (B, H, T, D), k and v (B, KV, T, D),
// all contiguous. Forward: qkv -> q, k, v, q and k rotated by (cos, sin), each (Bc, T, D), Bc 1 or B. Backward:
// dq, dk, dv -> dqkv, rotated back.
struct Heads {
  float* qkv;
  float* q;
  float* k;
  float* v;
  const float* cos;
  const float* sin;
  int64_t B, T, H, KV, D, cos_batches;
};

void heads(bool backward, const Heads& p) {
  const int64_t n = p.H + 2 * p.KV, D = p.D, T = p.T;
  at::parallel_for(0, p.B * T, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, n * D)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      float* row = p.qkv + r * n * D;
      const int64_t angles = ((p.cos_batches > 1 ? b : 0) * T + t) * D;
      for (int64_t h = 0; h < n; ++h) {
        float* head = h < p.H ? p.q + ((b * p.H + h) * T + t) * D
                    : h < p.H + p.KV ? p.k + ((b * p.KV + h - p.H) * T + t) * D
                    : p.v + ((b * p.KV + h - p.H - p.KV) * T + t) * D;
        const float* from = backward ? head : row + h * D;
        float* to = backward ? row + h * D : head;
        if (h < p.H + p.KV)
          rotate_head(backward, from, p.cos + angles, p.sin + angles, to, D);
        else
          std::memcpy(to, from, D * sizeof(float));
      }
    }
  });
}

// The backward of RMSNorm, y = x r w with r = 1 / sqrt(mean(x^2) + eps) per row of C values (the forward stays
// torch's own kernel: it is bit for bit transformers'). With x^ = x r and g = dy w:
// dx = r (g - x^ mean(g x^)), and dw = sum over rows of dy x^. torch runs this as about ten kernels; here one
// pass over the rows for dx and r, then one over column blocks for dw (each thread its own columns, no
// reduction between threads).
void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int64_t rows, int64_t C,
                      float eps) {
  std::vector<float> r(rows);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* xi = x + i * C;
      const float* dyi = dy + i * C;
      float squares = 0.f, dot = 0.f;
      int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
      __m256 squares8 = _mm256_setzero_ps(), dot8 = _mm256_setzero_ps();
      for (; c + 8 <= C; c += 8) {
        const __m256 xc = _mm256_loadu_ps(xi + c);
        squares8 = _mm256_fmadd_ps(xc, xc, squares8);
        dot8 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(dyi + c), _mm256_loadu_ps(w + c)), xc, dot8);
      }
      squares = sum8(squares8);
      dot = sum8(dot8);
#endif
      for (; c < C; ++c) {
        squares += xi[c] * xi[c];
        dot += dyi[c] * w[c] * xi[c];
      }
      const float ri = 1.f / std::sqrt(squares / C + eps);
      const float mean = dot * ri / C;  // mean(g x^)
      r[i] = ri;
      float* dxi = dx + i * C;
      c = 0;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 ri8 = _mm256_set1_ps(ri), shift = _mm256_set1_ps(ri * mean);
      for (; c + 8 <= C; c += 8) {
        const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(dyi + c), _mm256_loadu_ps(w + c));
        _mm256_storeu_ps(dxi + c, _mm256_mul_ps(ri8, _mm256_fnmadd_ps(_mm256_loadu_ps(xi + c), shift, g)));
      }
#endif
      for (; c < C; ++c) dxi[c] = ri * (dyi[c] * w[c] - xi[c] * ri * mean);
    }
  });
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    std::vector<float> sums(c1 - c0, 0.f);
    for (int64_t i = 0; i < rows; ++i) {
      const float* xi = x + i * C;
      const float* dyi = dy + i * C;
      int64_t c = c0;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 ri8 = _mm256_set1_ps(r[i]);
      for (; c + 8 <= c1; c += 8) {
        float* s = sums.data() + (c - c0);
        const __m256 xhat = _mm256_mul_ps(_mm256_loadu_ps(xi + c), ri8);
        _mm256_storeu_ps(s, _mm256_fmadd_ps(_mm256_loadu_ps(dyi + c), xhat, _mm256_loadu_ps(s)));
      }
#endif
      for (; c < c1; ++c) sums[c - c0] += dyi[c] * (xi[c] * r[i]);
    }
    std::copy(sums.begin(), sums.end(), dw + c0);
  });
}
