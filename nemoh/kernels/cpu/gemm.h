// Products of a few activation rows with a weight matrix in any format: y = x @ W^T, float32 accumulation.
//
// The weight is read once per call: each thread takes a contiguous range of output features, and for up to 4
// rows multiplies them against the weight as it is decoded (registers only). More rows decode a panel of NT
// weight rows into float32 once and run every 4-row tile against it, so decoding is not repeated per tile.
#pragma once
#include <algorithm>
#include <type_traits>

#include "weights.h"

namespace nemoh {

// What to do with each finished output value.
struct Epilogue {
    const float* bias;
    int32_t kind;       // NEMOH_STORE / NEMOH_RELU2 / NEMOH_ADD
    int32_t round;      // NEMOH_ROUND_*: how stored values are rounded
    float apply(float acc, int64_t n, float old) const {
        float v = act(acc + (bias ? bias[n] : 0.f), round);
        if (kind == NEMOH_RELU2) {
            v = v > 0.f ? v : 0.f;
            return act(v * v, round);
        }
        if (kind == NEMOH_ADD) return act(old + v, round);
        return v;
    }
};

// acc[m][j] = sum_k x[m, k] * W[n0 + j, k] for m < MT, j < NT.
template <class R, int MT, int NT>
static inline void dot_tile(const R& w, const float* x, int64_t xs, int64_t n0, int64_t K, float acc[MT][NT]) {
    int64_t k = 0;
#if NEMOH_AVX2
    __m256 va[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) va[m][j] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m256 w0[NT], w1[NT];
        for (int j = 0; j < NT; ++j) w.load16(n0 + j, k, w0[j], w1[j]);
        for (int m = 0; m < MT; ++m) {
            __m256 x0 = _mm256_loadu_ps(x + m * xs + k), x1 = _mm256_loadu_ps(x + m * xs + k + 8);
            for (int j = 0; j < NT; ++j) va[m][j] = _mm256_fmadd_ps(w1[j], x1, _mm256_fmadd_ps(w0[j], x0, va[m][j]));
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) acc[m][j] = hsum(va[m][j]);
    if constexpr (requires { R::kScaledSum; }) {
        for (int m = 0; m < MT; ++m)
            for (int j = 0; j < NT; ++j) acc[m][j] *= w.factor();
    }
#else
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) acc[m][j] = 0.f;
#endif
    for (; k < K; ++k)
        for (int j = 0; j < NT; ++j) {
            float wv = w.get(n0 + j, k);
            for (int m = 0; m < MT; ++m) acc[m][j] += wv * x[m * xs + k];
        }
}

#if NEMOH_AVX2
// NVFP4 without a trip through float weights: 32 inputs (two scale blocks) a step, each block's codes as exact
// small integers (twice the E2M1 value), its partial sum times the block's e4m3 scale, and the per-tensor
// 0.5 * scale_2 applied to the total; the result equals the reference up to float32 rounding.
template <int MT, int NT>
static inline void nvfp4_dot_tile(const NVFP4Rows& w, const float* x, int64_t xs, int64_t n0, int64_t K,
                                  float acc[MT][NT]) {
    const __m128i table = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low4 = _mm_set1_epi8(15);
    const float* e4m3 = kE4M3Table.v;
    const int64_t row_bytes = K >> 1, row_scales = K >> 4;
    __m256 va[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) va[m][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        for (int j = 0; j < NT; ++j) {
            const uint8_t* row = w.p + (n0 + j) * row_bytes + (k >> 1);
            const uint8_t* sc = w.s + (n0 + j) * row_scales + (k >> 4);
            __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
            __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
            __m128i c0 = _mm_shuffle_epi8(table, _mm_unpacklo_epi8(lo, hi));   // inputs k .. k+15
            __m128i c1 = _mm_shuffle_epi8(table, _mm_unpackhi_epi8(lo, hi));   // inputs k+16 .. k+31
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c0));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c0, 8)));
            __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c1));
            __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c1, 8)));
            __m256 s0 = _mm256_broadcast_ss(e4m3 + sc[0]), s1 = _mm256_broadcast_ss(e4m3 + sc[1]);
            for (int m = 0; m < MT; ++m) {
                const float* xm = x + m * xs + k;
                __m256 p0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(xm)));
                __m256 p1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24),
                                            _mm256_mul_ps(w2, _mm256_loadu_ps(xm + 16)));
                va[m][j] = _mm256_fmadd_ps(p1, s1, _mm256_fmadd_ps(p0, s0, va[m][j]));
            }
        }
    }
    const float half_scale_2 = 0.5f * w.scale_2;
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) acc[m][j] = hsum(va[m][j]) * half_scale_2;
    for (; k < K; ++k)   // a last single block of 16
        for (int j = 0; j < NT; ++j) {
            float wv = w.get(n0 + j, k);
            for (int m = 0; m < MT; ++m) acc[m][j] += wv * x[m * xs + k];
        }
}
#endif

template <class R, int MT, int NT>
static inline void store_tile(const R& w, const float* x, int64_t xs, int64_t n0, int64_t K, float* y, int64_t ys,
                              const Epilogue& ep) {
    float acc[MT][NT];
#if NEMOH_AVX2
    if constexpr (std::is_same_v<R, NVFP4Rows>) nvfp4_dot_tile<MT, NT>(w, x, xs, n0, K, acc);
    else dot_tile<R, MT, NT>(w, x, xs, n0, K, acc);
#else
    dot_tile<R, MT, NT>(w, x, xs, n0, K, acc);
#endif
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) y[m * ys + n0 + j] = ep.apply(acc[m][j], n0 + j, y[m * ys + n0 + j]);
}

// Rows [0, M) of y for output features [nb, ne), with up to 4 rows read straight from the weight.
template <class R, int MT>
static inline void few_rows(const R& w, const float* x, int64_t xs, int64_t nb, int64_t ne, int64_t K, float* y,
                            int64_t ys, const Epilogue& ep) {
    constexpr int NT = MT == 1 ? 4 : 2;
    int64_t n = nb;
    for (; n + NT <= ne; n += NT) store_tile<R, MT, NT>(w, x, xs, n, K, y, ys, ep);
    for (; n < ne; ++n) store_tile<R, MT, 1>(w, x, xs, n, K, y, ys, ep);
}

template <class R>
static void m_tiles(const R& w, const float* x, int64_t xs, int64_t M, int64_t nb, int64_t ne, int64_t K, float* y,
                    int64_t ys, const Epilogue& ep) {
    for (int64_t m = 0; m < M; m += 4) {
        int64_t mt = std::min<int64_t>(4, M - m);
        const float* xm = x + m * xs;
        float* ym = y + m * ys;
        if (mt == 1) few_rows<R, 1>(w, xm, xs, nb, ne, K, ym, ys, ep);
        else if (mt == 2) few_rows<R, 2>(w, xm, xs, nb, ne, K, ym, ys, ep);
        else if (mt == 3) few_rows<R, 3>(w, xm, xs, nb, ne, K, ym, ys, ep);
        else few_rows<R, 4>(w, xm, xs, nb, ne, K, ym, ys, ep);
    }
}

// part[m, j] += sum_{k < kb} x[m, k] * w[j, k] for m < MT, j < NT: float32 rows (a decoded panel, or a
// float32 weight read in place), 8 inputs a step so that 4 x 3 accumulators stay in registers.
template <int MT, int NT>
static inline void f32_tile(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t kb, float* part,
                            int64_t ldp) {
    float a[MT][NT];
    int64_t k = 0;
#if NEMOH_AVX2
    __m256 acc[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_setzero_ps();
    for (; k + 8 <= kb; k += 8) {
        __m256 wv[NT];
        for (int j = 0; j < NT; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
        for (int m = 0; m < MT; ++m) {
            __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
            for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_fmadd_ps(wv[j], xv, acc[m][j]);
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) a[m][j] = hsum(acc[m][j]);
#else
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) a[m][j] = 0.f;
#endif
    for (; k < kb; ++k)
        for (int m = 0; m < MT; ++m)
            for (int j = 0; j < NT; ++j) a[m][j] += w[j * ldw + k] * x[m * ldx + k];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) part[m * ldp + j] += a[m][j];
}

template <int MT>
static inline void f32_tiles_n(const float* w, int64_t ldw, int64_t np, const float* x, int64_t ldx, int64_t kb,
                               float* part, int64_t ldp) {
    int64_t j = 0;
    for (; j + 3 <= np; j += 3) f32_tile<MT, 3>(w + j * ldw, ldw, x, ldx, kb, part + j, ldp);
    if (np - j == 2) f32_tile<MT, 2>(w + j * ldw, ldw, x, ldx, kb, part + j, ldp);
    else if (np - j == 1) f32_tile<MT, 1>(w + j * ldw, ldw, x, ldx, kb, part + j, ldp);
}

// Scratch a thread needs for gemm_range: a decoded panel and the panel's partial sums.
static const int64_t kPanelRows = 48, kPanelInputs = 256;
static inline int64_t gemm_scratch_floats(int64_t M) { return kPanelRows * kPanelInputs + M * kPanelRows; }

// More than 4 rows: the weight in panels of kPanelRows features x kPanelInputs inputs (decoded to float32 once,
// small enough for the L2 cache with the rows of x it meets), every 4-row tile of x against each panel, partial
// sums kept per panel until its last block of inputs, then the epilogue. Each weight element is read and
// decoded once per call; x is read once per panel.
template <class R>
static void gemm_range(const R& w, const float* x, int64_t xs, int64_t M, int64_t nb, int64_t ne, int64_t K,
                       float* y, int64_t ys, const Epilogue& ep, float* scratch) {
    constexpr bool in_place = std::is_same_v<R, F32Rows>;
    float* panel = scratch;
    float* part = scratch + kPanelRows * kPanelInputs;
    for (int64_t n0 = nb; n0 < ne; n0 += kPanelRows) {
        int64_t np = std::min<int64_t>(kPanelRows, ne - n0);
        std::fill(part, part + M * np, 0.f);
        for (int64_t k0 = 0; k0 < K; k0 += kPanelInputs) {
            int64_t kb = std::min<int64_t>(kPanelInputs, K - k0);
            const float* pw;
            int64_t ldw;
            if constexpr (in_place) {
                pw = w.p + n0 * w.ld + k0;
                ldw = w.ld;
            } else {
                for (int64_t j = 0; j < np; ++j) {
                    int64_t k = 0;
#if NEMOH_AVX2
                    // NVFP4's 16-input blocks and the other formats' 16-wide loads start on k0 (a multiple of 16)
                    for (; k + 16 <= kb; k += 16) {
                        __m256 a, b;
                        w.load16(n0 + j, k0 + k, a, b);
                        if constexpr (requires { R::kScaledSum; }) {
                            const __m256 f = _mm256_set1_ps(w.factor());
                            a = _mm256_mul_ps(a, f);
                            b = _mm256_mul_ps(b, f);
                        }
                        _mm256_storeu_ps(panel + j * kPanelInputs + k, a);
                        _mm256_storeu_ps(panel + j * kPanelInputs + k + 8, b);
                    }
#endif
                    for (; k < kb; ++k) panel[j * kPanelInputs + k] = w.get(n0 + j, k0 + k);
                }
                pw = panel;
                ldw = kPanelInputs;
            }
            for (int64_t m = 0; m < M; m += 4) {
                int64_t mt = std::min<int64_t>(4, M - m);
                const float* xm = x + m * xs + k0;
                float* pm = part + m * np;
                if (mt == 4) f32_tiles_n<4>(pw, ldw, np, xm, xs, kb, pm, np);
                else if (mt == 3) f32_tiles_n<3>(pw, ldw, np, xm, xs, kb, pm, np);
                else if (mt == 2) f32_tiles_n<2>(pw, ldw, np, xm, xs, kb, pm, np);
                else f32_tiles_n<1>(pw, ldw, np, xm, xs, kb, pm, np);
            }
        }
        for (int64_t m = 0; m < M; ++m)
            for (int64_t j = 0; j < np; ++j)
                y[m * ys + n0 + j] = ep.apply(part[m * np + j], n0 + j, y[m * ys + n0 + j]);
    }
}

// y[m, n] for m < M and n in [nb, ne); `scratch`: gemm_scratch_floats(M) floats, used when M > 4.
static inline void linear_range(const Weight& w, const float* x, int64_t xs, int64_t M, int64_t nb, int64_t ne,
                                float* y, int64_t ys, const Epilogue& ep, float* scratch) {
    with_rows(w, [&](const auto& r) {
        using R = std::decay_t<decltype(r)>;
        if (M <= 4) m_tiles<R>(r, x, xs, M, nb, ne, w.k, y, ys, ep);
        else gemm_range<R>(r, x, xs, M, nb, ne, w.k, y, ys, ep, scratch);
    });
}

}  // namespace nemoh
