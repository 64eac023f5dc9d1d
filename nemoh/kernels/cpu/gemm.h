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
#if NEMOH_AVX2
    // y[0:8] = apply(acc[i], n + i, y[i]) for 8 consecutive outputs
    void apply8(__m256 acc, int64_t n, float* y) const {
        if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias + n));
        __m256 v = round8(acc);
        if (kind == NEMOH_RELU2) {
            v = _mm256_max_ps(v, _mm256_setzero_ps());
            v = round8(_mm256_mul_ps(v, v));
        } else if (kind == NEMOH_ADD) {
            v = round8(_mm256_add_ps(_mm256_loadu_ps(y), v));
        }
        _mm256_storeu_ps(y, v);
    }
    __m256 round8(__m256 v) const {
        if (round == NEMOH_ROUND_BF16) {
            // round to nearest even on the upper 16 bits, as round_bf16 does; NaN kept
            const __m256i u = _mm256_castps_si256(v);
            const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)),
                                               _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
            return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        if (round == NEMOH_ROUND_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        return v;
    }
#endif
};

// Weight bytes this far ahead of a row being read are asked for while it is computed: a model's rows are often
// short (512 inputs, 1 KiB in bfloat16), too short for the hardware prefetcher to run ahead of the DRAM latency
// by itself.
#ifndef NEMOH_PREFETCH_BYTES
#define NEMOH_PREFETCH_BYTES 2048
#endif
static const int64_t kPrefetchBytes = NEMOH_PREFETCH_BYTES;
static const int64_t kPrefetchRows = 8;

template <class R>
static inline void prefetch_ahead(const R& w, int64_t n, int64_t k);

template <class R>
static inline void prefetch_ahead(const R& w, int64_t n, int64_t k) {
#if NEMOH_AVX2
    _mm_prefetch(static_cast<const char*>(w.addr(n, k)) + kPrefetchBytes, _MM_HINT_T0);
#else
    (void)w, (void)n, (void)k;
#endif
}

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
        if ((k & 31) == 0)
            for (int j = 0; j < NT; ++j) prefetch_ahead(w, n0 + j, k);
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
            if ((k & 127) == 0) {
                _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * row_bytes), _MM_HINT_T0);
                _mm_prefetch(reinterpret_cast<const char*>(sc + kPrefetchRows * row_scales), _MM_HINT_T0);
            }
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

// One row of x against one weight row (a decode step's product): four independent partial sums so that the
// FMA latency never limits, and the rows ahead prefetched. The weight is read as one sequential stream (rows in
// order), which keeps the hardware prefetcher going even when rows are short.
template <class R>
static inline float dot_row(const R& w, const float* x, int64_t n, int64_t K) {
    int64_t k = 0;
    float total = 0.f;
#if NEMOH_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        prefetch_ahead(w, n, k);
        __m256 a, b, c, d;
        w.load16(n, k, a, b);
        w.load16(n, k + 16, c, d);
        s0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + k), s0);
        s1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + k + 8), s1);
        s2 = _mm256_fmadd_ps(c, _mm256_loadu_ps(x + k + 16), s2);
        s3 = _mm256_fmadd_ps(d, _mm256_loadu_ps(x + k + 24), s3);
    }
    for (; k + 16 <= K; k += 16) {
        __m256 a, b;
        w.load16(n, k, a, b);
        s0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + k), s0);
        s1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + k + 8), s1);
    }
    total = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    if constexpr (requires { R::kScaledSum; }) total *= w.factor();
#endif
    for (; k < K; ++k) total += w.get(n, k) * x[k];
    return total;
}

#if NEMOH_AVX2
// One NVFP4 row against one row of x: 64 inputs (four scale blocks) an iteration, one accumulator per block so that
// the FMA chains are short, the block scale applied to each block's partial sum, 0.5 * scale_2 at the end.
static inline float nvfp4_dot_row(const NVFP4Rows& w, const float* x, int64_t n, int64_t K) {
    const __m128i table = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low4 = _mm_set1_epi8(15);
    const float* e4m3 = kE4M3Table.v;
    const uint8_t* row = w.p + n * (K >> 1);
    const uint8_t* sc = w.s + n * (K >> 4);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    auto block = [&](__m128i codes, int64_t k, int slot) {
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8)));
        const __m256 p = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(x + k)));
        acc[slot] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(e4m3 + sc[k >> 4]), acc[slot]);
    };
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(row + (k >> 1)) + kPrefetchBytes, _MM_HINT_T0);
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (k >> 1)));
        const __m128i b0 = _mm256_castsi256_si128(bytes), b1 = _mm256_extracti128_si256(bytes, 1);
        const __m128i lo0 = _mm_and_si128(b0, low4), hi0 = _mm_and_si128(_mm_srli_epi16(b0, 4), low4);
        const __m128i lo1 = _mm_and_si128(b1, low4), hi1 = _mm_and_si128(_mm_srli_epi16(b1, 4), low4);
        block(_mm_shuffle_epi8(table, _mm_unpacklo_epi8(lo0, hi0)), k, 0);
        block(_mm_shuffle_epi8(table, _mm_unpackhi_epi8(lo0, hi0)), k + 16, 1);
        block(_mm_shuffle_epi8(table, _mm_unpacklo_epi8(lo1, hi1)), k + 32, 2);
        block(_mm_shuffle_epi8(table, _mm_unpackhi_epi8(lo1, hi1)), k + 48, 3);
    }
    for (; k + 16 <= K; k += 16) {               // the last one to three blocks
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (k >> 1)));
        block(_mm_shuffle_epi8(table, _mm_unpacklo_epi8(_mm_and_si128(b, low4),
                                                        _mm_and_si128(_mm_srli_epi16(b, 4), low4))), k, 0);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) * (0.5f * w.scale_2);
}
#endif

template <class R, int MT, int NT>
static inline void store_tile(const R& w, const float* x, int64_t xs, int64_t n0, int64_t K, float* y, int64_t ys,
                              const Epilogue& ep) {
    float acc[MT][NT];
#if NEMOH_AVX2
    if constexpr (std::is_same_v<R, NVFP4Rows> && MT == 1 && NT == 1) acc[0][0] = nvfp4_dot_row(w, x, n0, K);
    else if constexpr (std::is_same_v<R, NVFP4Rows>) nvfp4_dot_tile<MT, NT>(w, x, xs, n0, K, acc);
    else if constexpr (MT == 1 && NT == 1) acc[0][0] = dot_row(w, x, n0, K);
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
    constexpr int NT = MT == 1 ? 1 : 2;
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

// Scratch a thread needs for gemm_range: a panel of 16 weight rows decoded to float32 and transposed.
static const int64_t kPanelCols = 16;
static inline int64_t gemm_scratch_floats(int64_t M, int64_t K) { return kPanelCols * K + M * kPanelCols; }

// part[m, 0:16] = sum_k x[m, k] * panel[k, 0:16] for m < MR: the outer-product form (each x value broadcast, the
// 16 weights of a k in two vectors), 2 x MR accumulators in registers, no horizontal sums.
template <int MR>
static inline void outer_tile(const float* panel, int64_t K, const float* x, int64_t xs, float* part) {
#if NEMOH_AVX2
    __m256 lo[MR], hi[MR];
    for (int m = 0; m < MR; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(panel + k * kPanelCols), b1 = _mm256_loadu_ps(panel + k * kPanelCols + 8);
        for (int m = 0; m < MR; ++m) {
            const __m256 a = _mm256_broadcast_ss(x + m * xs + k);
            lo[m] = _mm256_fmadd_ps(a, b0, lo[m]);
            hi[m] = _mm256_fmadd_ps(a, b1, hi[m]);
        }
    }
    for (int m = 0; m < MR; ++m) {
        _mm256_storeu_ps(part + m * kPanelCols, lo[m]);
        _mm256_storeu_ps(part + m * kPanelCols + 8, hi[m]);
    }
#else
    for (int m = 0; m < MR; ++m)
        for (int64_t j = 0; j < kPanelCols; ++j) {
            float sum = 0.f;
            for (int64_t k = 0; k < K; ++k) sum += x[m * xs + k] * panel[k * kPanelCols + j];
            part[m * kPanelCols + j] = sum;
        }
#endif
}

#if NEMOH_AVX2
// r[i] <- column i of the 8 x 8 block whose rows are r[0..7]
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#endif

// panel[k, j] = W[n0 + j, k] for j < 16 (zero for j >= cols), k < K: 8 rows x 8 inputs at a time, decoded and
// transposed in registers.
template <class R>
static void build_panel(const R& w, int64_t n0, int64_t cols, int64_t K, float* panel) {
    int64_t k_done = 0;
#if NEMOH_AVX2
    if (cols == kPanelCols) {
        for (int64_t j0 = 0; j0 < kPanelCols; j0 += 8) {
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
                __m256 a[8], b[8];
                for (int i = 0; i < 8; ++i) {
                    w.load16(n0 + j0 + i, k, a[i], b[i]);
                    if constexpr (requires { R::kScaledSum; }) {
                        const __m256 f = _mm256_set1_ps(w.factor());
                        a[i] = _mm256_mul_ps(a[i], f);
                        b[i] = _mm256_mul_ps(b[i], f);
                    }
                }
                transpose8(a);
                transpose8(b);
                for (int i = 0; i < 8; ++i) {
                    _mm256_storeu_ps(panel + (k + i) * kPanelCols + j0, a[i]);
                    _mm256_storeu_ps(panel + (k + 8 + i) * kPanelCols + j0, b[i]);
                }
            }
            k_done = k;
        }
    }
#endif
    for (int64_t j = 0; j < kPanelCols; ++j)
        for (int64_t k = k_done; k < K; ++k) panel[k * kPanelCols + j] = j < cols ? w.get(n0 + j, k) : 0.f;
}

// More than 4 rows (a batch of sequences, a verification, a small prefill chunk): 16 weight rows at a time are
// decoded to float32 and transposed into a panel (read as one sequential stream: what the hardware prefetcher
// follows best), then every 6-row tile of x runs against the panel in the outer-product form, and the epilogue.
// Each weight element is read and decoded once per call.
template <class R>
static void gemm_range(const R& w, const float* x, int64_t xs, int64_t M, int64_t nb, int64_t ne, int64_t K,
                       float* y, int64_t ys, const Epilogue& ep, float* scratch) {
    float* panel = scratch;                              // (K, 16)
    float* part = scratch + kPanelCols * K;              // (M, 16)
    for (int64_t n0 = nb; n0 < ne; n0 += kPanelCols) {
        const int64_t cols = std::min<int64_t>(kPanelCols, ne - n0);
        build_panel(w, n0, cols, K, panel);
        int64_t m = 0;
        for (; m + 6 <= M; m += 6) outer_tile<6>(panel, K, x + m * xs, xs, part + m * kPanelCols);
        switch (M - m) {
            case 5: outer_tile<5>(panel, K, x + m * xs, xs, part + m * kPanelCols); break;
            case 4: outer_tile<4>(panel, K, x + m * xs, xs, part + m * kPanelCols); break;
            case 3: outer_tile<3>(panel, K, x + m * xs, xs, part + m * kPanelCols); break;
            case 2: outer_tile<2>(panel, K, x + m * xs, xs, part + m * kPanelCols); break;
            case 1: outer_tile<1>(panel, K, x + m * xs, xs, part + m * kPanelCols); break;
            default: break;
        }
        for (int64_t mm = 0; mm < M; ++mm) {
            int64_t j = 0;
#if NEMOH_AVX2
            for (; j + 8 <= cols; j += 8) ep.apply8(_mm256_loadu_ps(part + mm * kPanelCols + j), n0 + j, y + mm * ys + n0 + j);
#endif
            for (; j < cols; ++j) y[mm * ys + n0 + j] = ep.apply(part[mm * kPanelCols + j], n0 + j, y[mm * ys + n0 + j]);
        }
    }
}

// y[m, n] for m < M and n in [nb, ne), the weight in its plain layout; `scratch`: gemm_scratch_floats(M, K)
// floats, used when M > 4.
static inline void plain_range(const Weight& w, const float* x, int64_t xs, int64_t M, int64_t nb, int64_t ne,
                                float* y, int64_t ys, const Epilogue& ep, float* scratch) {
    with_rows(w, [&](const auto& r) {
        using R = std::decay_t<decltype(r)>;
        if (M <= 4) m_tiles<R>(r, x, xs, M, nb, ne, w.k, y, ys, ep);
        else gemm_range<R>(r, x, xs, M, nb, ne, w.k, y, ys, ep, scratch);
    });
}

}  // namespace nemoh
