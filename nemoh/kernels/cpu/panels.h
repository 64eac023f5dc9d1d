// Products with weights in the panel layout (NEMOH_PANELS, see nemoh_cpu.h): 16 output features at a time, the
// weights of one input k side by side. A panel is read as one sequential stream, its 16 weights of an input k
// are two vectors (decoded in registers), and every row of x multiplies them in the outer-product form (x[m, k]
// broadcast, 2 accumulators per row, no horizontal sums): a batch's rows share each weight as it is decoded and
// nothing is transposed at run time. Values equal the plain layout's products up to float32 rounding.
#pragma once
#include "gemm.h"

namespace nemoh {

// Readers of one panel: load(k, lo, hi) gives the float32 weights of input k for features 0-7 and 8-15.
struct PanelF32 {
    const float* p;
#if NEMOH_AVX2
    void load(int64_t k, __m256& lo, __m256& hi) const {
        lo = _mm256_loadu_ps(p + k * NEMOH_PANEL);
        hi = _mm256_loadu_ps(p + k * NEMOH_PANEL + 8);
    }
#endif
    float get(int64_t k, int c) const { return p[k * NEMOH_PANEL + c]; }
};

struct PanelBF16 {
    const uint16_t* p;
#if NEMOH_AVX2
    void load(int64_t k, __m256& lo, __m256& hi) const {
        lo = load_bf16x8(p + k * NEMOH_PANEL);
        hi = load_bf16x8(p + k * NEMOH_PANEL + 8);
    }
#endif
    float get(int64_t k, int c) const { return bf16_to_f32(p[k * NEMOH_PANEL + c]); }
};

struct PanelF16 {
    const uint16_t* p;
#if NEMOH_AVX2
    void load(int64_t k, __m256& lo, __m256& hi) const {
        lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * NEMOH_PANEL)));
        hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * NEMOH_PANEL + 8)));
    }
#endif
    float get(int64_t k, int c) const { return f16_to_f32(p[k * NEMOH_PANEL + c]); }
};

// FP8: the weights as q / 256 (exact); the sums are multiplied by 256 * scale at the end (`factor`)
struct PanelFP8 {
    const uint8_t* p;
    float scale;
    static constexpr bool kScaledSum = true;
    float factor() const { return scale * 256.f; }
#if NEMOH_AVX2
    void load(int64_t k, __m256& lo, __m256& hi) const {
        __m256i w = _mm256_slli_epi16(
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * NEMOH_PANEL))), 8);
        __m256i h = _mm256_and_si256(_mm256_srai_epi16(w, 1), _mm256_set1_epi16(static_cast<short>(0xbf80)));
        lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    }
#endif
    float get(int64_t k, int c) const { return kE4M3Table.v[p[k * NEMOH_PANEL + c]] / 256.f; }
};

// NVFP4: codes (k, 8 bytes), block scales (k / 16, 16 e4m3); weights = e2m1 * block scale * scale_2, decoded as
// twice the e2m1 value (exact integers) times half the scale product
struct PanelNVFP4 {
    const uint8_t* p;
    const uint8_t* s;
    float scale_2;
#if NEMOH_AVX2
    // the 16 features' scales of the block holding input k, times 0.5 * scale_2
    void block_scales(int64_t k, __m256& lo, __m256& hi) const {
        const __m256 f = _mm256_set1_ps(0.5f * scale_2 * 256.f);
        __m256i w = _mm256_slli_epi16(
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + (k >> 4) * NEMOH_PANEL))), 8);
        __m256i h = _mm256_and_si256(_mm256_srai_epi16(w, 1), _mm256_set1_epi16(static_cast<short>(0xbf80)));
        lo = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), f);
        hi = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), f);
    }
    // twice the e2m1 values of input k's 16 features (unscaled)
    static void codes(const uint8_t* bytes, __m256& lo, __m256& hi) {
        const __m128i table = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        const __m128i low4 = _mm_set1_epi8(15);
        __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
        __m128i v = _mm_shuffle_epi8(table, _mm_unpacklo_epi8(_mm_and_si128(b, low4),
                                                              _mm_and_si128(_mm_srli_epi16(b, 4), low4)));
        lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
    }
#endif
    float get(int64_t k, int c) const {
        const uint8_t byte = p[k * 8 + c / 2];
        const float scale = kE4M3Table.v[s[(k >> 4) * NEMOH_PANEL + c]] * scale_2;
        return kE2M1[(c & 1) ? (byte >> 4) : (byte & 15)] * scale;
    }
};

// part[m, 0:16] = sum_k x[m, k] * panel weights (k, 0:16) for m < MR
template <class P, int MR>
__attribute__((always_inline)) static inline void panel_tile(const P& pr, int64_t K, const float* x, int64_t xs,
                                                          float* part) {
#if NEMOH_AVX2
    __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
        lo[m] = _mm256_setzero_ps();
        hi[m] = _mm256_setzero_ps();
    }
    if constexpr (std::is_same_v<P, PanelNVFP4>) {
        for (int64_t k0 = 0; k0 < K; k0 += 16) {            // K is a multiple of 16 for NVFP4
            __m256 s_lo, s_hi;
            pr.block_scales(k0, s_lo, s_hi);
            for (int64_t k = k0; k < k0 + 16; ++k) {
                __m256 b0, b1;
                PanelNVFP4::codes(pr.p + k * 8, b0, b1);
                b0 = _mm256_mul_ps(b0, s_lo);
                b1 = _mm256_mul_ps(b1, s_hi);
                for (int m = 0; m < MR; ++m) {
                    const __m256 a = _mm256_broadcast_ss(x + m * xs + k);
                    lo[m] = _mm256_fmadd_ps(a, b0, lo[m]);
                    hi[m] = _mm256_fmadd_ps(a, b1, hi[m]);
                }
            }
        }
    } else {
        for (int64_t k = 0; k < K; ++k) {
            __m256 b0, b1;
            pr.load(k, b0, b1);
            for (int m = 0; m < MR; ++m) {
                const __m256 a = _mm256_broadcast_ss(x + m * xs + k);
                lo[m] = _mm256_fmadd_ps(a, b0, lo[m]);
                hi[m] = _mm256_fmadd_ps(a, b1, hi[m]);
            }
        }
    }
    if constexpr (requires { P::kScaledSum; }) {
        const __m256 f = _mm256_set1_ps(pr.factor());
        for (int m = 0; m < MR; ++m) {
            lo[m] = _mm256_mul_ps(lo[m], f);
            hi[m] = _mm256_mul_ps(hi[m], f);
        }
    }
    for (int m = 0; m < MR; ++m) {
        _mm256_storeu_ps(part + m * NEMOH_PANEL, lo[m]);
        _mm256_storeu_ps(part + m * NEMOH_PANEL + 8, hi[m]);
    }
#else
    for (int m = 0; m < MR; ++m)
        for (int c = 0; c < NEMOH_PANEL; ++c) {
            float sum = 0.f;
            for (int64_t k = 0; k < K; ++k) sum += x[m * xs + k] * pr.get(k, c);
            if constexpr (requires { P::kScaledSum; }) sum *= pr.factor();
            part[m * NEMOH_PANEL + c] = sum;
        }
#endif
}

// One row of x (a decode step) against a panel: two interleaved input halves, 4 accumulators, so that the FMA
// latency never limits the stream.
template <class P>
static inline void panel_row(const P& pr, int64_t K, const float* x, float* part) {
#if NEMOH_AVX2
    if constexpr (!std::is_same_v<P, PanelNVFP4>) {
        __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0;
        int64_t k = 0;
        for (; k + 2 <= K; k += 2) {
            __m256 a0, b0, a1, b1;
            pr.load(k, a0, b0);
            pr.load(k + 1, a1, b1);
            const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
            l0 = _mm256_fmadd_ps(x0, a0, l0);
            h0 = _mm256_fmadd_ps(x0, b0, h0);
            l1 = _mm256_fmadd_ps(x1, a1, l1);
            h1 = _mm256_fmadd_ps(x1, b1, h1);
        }
        if (k < K) {
            __m256 a0, b0;
            pr.load(k, a0, b0);
            const __m256 x0 = _mm256_broadcast_ss(x + k);
            l0 = _mm256_fmadd_ps(x0, a0, l0);
            h0 = _mm256_fmadd_ps(x0, b0, h0);
        }
        __m256 lo = _mm256_add_ps(l0, l1), hi = _mm256_add_ps(h0, h1);
        if constexpr (requires { P::kScaledSum; }) {
            lo = _mm256_mul_ps(lo, _mm256_set1_ps(pr.factor()));
            hi = _mm256_mul_ps(hi, _mm256_set1_ps(pr.factor()));
        }
        _mm256_storeu_ps(part, lo);
        _mm256_storeu_ps(part + 8, hi);
        return;
    }
#endif
    panel_tile<P, 1>(pr, K, x, K, part);
}

// From this many rows an NVFP4 panel is decoded to float32 once per pass rather than once per tile of rows.
static const int64_t kDecodeOnceRows = 6;

// A panel's float32 weights (K x 16) in this thread's buffer, as panel_tile decodes them.
template <class P>
static const float* decode_panel(const P& pr, int64_t K) {
    static thread_local std::vector<float> buffer;
    if (static_cast<int64_t>(buffer.size()) < K * NEMOH_PANEL) buffer.resize(K * NEMOH_PANEL);
    float* out = buffer.data();
    if constexpr (std::is_same_v<P, PanelNVFP4>) {
#if NEMOH_AVX2
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            __m256 s_lo, s_hi;
            pr.block_scales(k0, s_lo, s_hi);
            for (int64_t k = k0; k < k0 + 16; ++k) {
                __m256 b0, b1;
                PanelNVFP4::codes(pr.p + k * 8, b0, b1);
                _mm256_storeu_ps(out + k * NEMOH_PANEL, _mm256_mul_ps(b0, s_lo));
                _mm256_storeu_ps(out + k * NEMOH_PANEL + 8, _mm256_mul_ps(b1, s_hi));
            }
        }
        return out;
#endif
    }
#if NEMOH_AVX2
    if constexpr (std::is_same_v<P, PanelFP8>) {       // q / 256, exact: the factor stays on the sums
        for (int64_t k = 0; k < K; ++k) {
            __m256 lo, hi;
            pr.load(k, lo, hi);
            _mm256_storeu_ps(out + k * NEMOH_PANEL, lo);
            _mm256_storeu_ps(out + k * NEMOH_PANEL + 8, hi);
        }
        return out;
    }
#endif
    for (int64_t k = 0; k < K; ++k)
        for (int c = 0; c < NEMOH_PANEL; ++c) out[k * NEMOH_PANEL + c] = pr.get(k, c);
    return out;
}

// A decoded panel: float32 weights, the sums multiplied by `f` at the end (FP8's 256 * scale, else 1).
struct PanelF32Scaled : PanelF32 {
    float f;
    static constexpr bool kScaledSum = true;
    float factor() const { return f; }
};

// The reader of one decoded panel (whatever the panel index: the buffer holds the panel being computed).
struct DecodedPanel {
    const float* p;
    float factor;
    PanelF32Scaled operator()(int64_t) const { return PanelF32Scaled{{p}, factor}; }
};

// Rows of x per pass over the panels: a block of x stays in the L2 cache while every panel meets it (a prefill
// chunk of 2048 rows would otherwise stream x from memory once per panel).
static const int64_t kRowBlock = 96;

// y[m, n] for m < M and features [nb, ne) (nb a multiple of 16), the weight in panels.
template <class P, class MakeReader>
static void panel_range(MakeReader reader_of, const float* x, int64_t xs, int64_t M, int64_t nb, int64_t ne,
                        int64_t K, float* y, int64_t ys, const Epilogue& ep, float* part) {
    if (M > kRowBlock) {
        for (int64_t m0 = 0; m0 < M; m0 += kRowBlock)
            panel_range<P>(reader_of, x + m0 * xs, xs, std::min(kRowBlock, M - m0), nb, ne, K, y + m0 * ys, ys, ep,
                           part);
        return;
    }
    for (int64_t n0 = nb; n0 < ne; n0 += NEMOH_PANEL) {
        const P pr = reader_of(n0 / NEMOH_PANEL);
        const int64_t cols = std::min<int64_t>(NEMOH_PANEL, ne - n0);
        if constexpr (std::is_same_v<P, PanelNVFP4> || std::is_same_v<P, PanelFP8>) {
            if (M > kDecodeOnceRows) {
                // decode the panel once (the floats panel_tile makes in registers) and let every tile of rows read
                // them: decoding per tile of 6 rows costs about half the tile's multiply-adds (NVFP4)
                float factor = 1.f;
                if constexpr (std::is_same_v<P, PanelFP8>) factor = pr.factor();
                panel_range<PanelF32Scaled>(DecodedPanel{decode_panel(pr, K), factor}, x, xs, M, n0,
                                            std::min(n0 + NEMOH_PANEL, ne), K, y, ys, ep, part);
                continue;
            }
        }
        if (M == 1) {
            panel_row(pr, K, x, part);
        } else {
            int64_t m = 0;
            for (; m + 6 <= M; m += 6) panel_tile<P, 6>(pr, K, x + m * xs, xs, part + m * NEMOH_PANEL);
            switch (M - m) {
                case 5: panel_tile<P, 5>(pr, K, x + m * xs, xs, part + m * NEMOH_PANEL); break;
                case 4: panel_tile<P, 4>(pr, K, x + m * xs, xs, part + m * NEMOH_PANEL); break;
                case 3: panel_tile<P, 3>(pr, K, x + m * xs, xs, part + m * NEMOH_PANEL); break;
                case 2: panel_tile<P, 2>(pr, K, x + m * xs, xs, part + m * NEMOH_PANEL); break;
                case 1: panel_tile<P, 1>(pr, K, x + m * xs, xs, part + m * NEMOH_PANEL); break;
                default: break;
            }
        }
        for (int64_t mm = 0; mm < M; ++mm) {
            int64_t j = 0;
#if NEMOH_AVX2
            for (; j + 8 <= cols; j += 8)
                ep.apply8(_mm256_loadu_ps(part + mm * NEMOH_PANEL + j), n0 + j, y + mm * ys + n0 + j);
#endif
            for (; j < cols; ++j)
                y[mm * ys + n0 + j] = ep.apply(part[mm * NEMOH_PANEL + j], n0 + j, y[mm * ys + n0 + j]);
        }
    }
}

// Features [nb, ne) of a weight in the panel layout (format | NEMOH_PANELS); `part` holds M x 16 floats.
static inline void panels_range(const Weight& w, const float* x, int64_t xs, int64_t M, int64_t nb, int64_t ne,
                                float* y, int64_t ys, const Epilogue& ep, float* part) {
    const int64_t K = w.k;
    switch (w.format & ~NEMOH_PANELS) {
        case NEMOH_F32: {
            const float* p = static_cast<const float*>(w.data);
            panel_range<PanelF32>([&](int64_t i) { return PanelF32{p + i * K * NEMOH_PANEL}; }, x, xs, M, nb, ne,
                                  K, y, ys, ep, part);
            break;
        }
        case NEMOH_BF16: {
            const uint16_t* p = static_cast<const uint16_t*>(w.data);
            panel_range<PanelBF16>([&](int64_t i) { return PanelBF16{p + i * K * NEMOH_PANEL}; }, x, xs, M, nb,
                                   ne, K, y, ys, ep, part);
            break;
        }
        case NEMOH_F16: {
            const uint16_t* p = static_cast<const uint16_t*>(w.data);
            panel_range<PanelF16>([&](int64_t i) { return PanelF16{p + i * K * NEMOH_PANEL}; }, x, xs, M, nb, ne,
                                  K, y, ys, ep, part);
            break;
        }
        case NEMOH_FP8: {
            const uint8_t* p = static_cast<const uint8_t*>(w.data);
            panel_range<PanelFP8>([&](int64_t i) { return PanelFP8{p + i * K * NEMOH_PANEL, w.scale}; }, x, xs, M,
                                  nb, ne, K, y, ys, ep, part);
            break;
        }
        default: {
            const uint8_t* p = static_cast<const uint8_t*>(w.data);
            panel_range<PanelNVFP4>([&](int64_t i) {
                return PanelNVFP4{p + i * K * 8, w.block_scale + i * (K / 16) * NEMOH_PANEL, w.scale};
            }, x, xs, M, nb, ne, K, y, ys, ep, part);
            break;
        }
    }
}

// y[m, n] for m < M and n in [nb, ne) (nb a multiple of 16), the weight in either layout; `scratch`:
// gemm_scratch_floats(M, K) floats.
static inline void linear_range(const Weight& w, const float* x, int64_t xs, int64_t M, int64_t nb, int64_t ne,
                                float* y, int64_t ys, const Epilogue& ep, float* scratch) {
    if (w.format & NEMOH_PANELS) panels_range(w, x, xs, M, nb, ne, y, ys, ep, scratch);
    else plain_range(w, x, xs, M, nb, ne, y, ys, ep, scratch);
}

}  // namespace nemoh
