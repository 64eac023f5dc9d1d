// Readers of one weight matrix in each format: element access for tails and scalar code, and (AVX2) 16
// consecutive elements of a row decoded to float32 in two vectors, scales applied. Every decoded value equals
// the float32 the dequantise-then-multiply reference computes for it (nemoh.quant.nvfp4 / fp8).
#pragma once
#include "common.h"

namespace nemoh {

struct F32Rows {
    const float* p;
    int64_t ld;
    const void* addr(int64_t n, int64_t k) const { return p + n * ld + k; }
    float get(int64_t n, int64_t k) const { return p[n * ld + k]; }
#if NEMOH_AVX2
    void load16(int64_t n, int64_t k, __m256& a, __m256& b) const {
        a = _mm256_loadu_ps(p + n * ld + k);
        b = _mm256_loadu_ps(p + n * ld + k + 8);
    }
#endif
};

struct BF16Rows {
    const uint16_t* p;
    int64_t ld;
    const void* addr(int64_t n, int64_t k) const { return p + n * ld + k; }
    float get(int64_t n, int64_t k) const { return bf16_to_f32(p[n * ld + k]); }
#if NEMOH_AVX2
    void load16(int64_t n, int64_t k, __m256& a, __m256& b) const {
        a = load_bf16x8(p + n * ld + k);
        b = load_bf16x8(p + n * ld + k + 8);
    }
#endif
};

struct F16Rows {
    const uint16_t* p;
    int64_t ld;
    const void* addr(int64_t n, int64_t k) const { return p + n * ld + k; }
    float get(int64_t n, int64_t k) const { return f16_to_f32(p[n * ld + k]); }
#if NEMOH_AVX2
    void load16(int64_t n, int64_t k, __m256& a, __m256& b) const {
        a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + n * ld + k)));
        b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + n * ld + k + 8)));
    }
#endif
};

// float8_e4m3fn with one float32 scale per tensor: W = float(q) * scale. The vector path sums float(q) / 256
// times x and multiplies the sum by 256 * scale once (`factor`): the same products up to float32 rounding.
struct FP8Rows {
    const uint8_t* p;
    int64_t ld;
    float scale;
    const void* addr(int64_t n, int64_t k) const { return p + n * ld + k; }
    static constexpr bool kScaledSum = true;
    float factor() const { return scale * 256.f; }
    float get(int64_t n, int64_t k) const { return kE4M3Table.v[p[n * ld + k]] * scale; }
#if NEMOH_AVX2
    void load16(int64_t n, int64_t k, __m256& a, __m256& b) const {
        // bytes to words b << 8, arithmetic shift right by one (sign stays in bit 15), clear bit 14 and the low
        // bits: sign | exponent-and-mantissa << 7, a float16 of value q / 256
        __m256i wds = _mm256_slli_epi16(
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + n * ld + k))), 8);
        __m256i h = _mm256_and_si256(_mm256_srai_epi16(wds, 1), _mm256_set1_epi16(static_cast<short>(0xbf80)));
        a = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        b = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    }
#endif
};

// NVFP4: W[n, k] = e2m1(code) * (float(block_scale[n, k / 16]) * scale_2), as nemoh.quant.nvfp4 computes it.
struct NVFP4Rows {
    const uint8_t* p;        // (n, k/2)
    const uint8_t* s;        // (n, k/16) e4m3
    int64_t k;               // in_features
    float scale_2;
    const void* addr(int64_t n, int64_t kk) const { return p + n * (k >> 1) + (kk >> 1); }
    float block(int64_t n, int64_t kb) const { return kE4M3Table.v[s[n * (k >> 4) + kb]] * scale_2; }
    float get(int64_t n, int64_t kk) const {
        uint8_t byte = p[n * (k >> 1) + (kk >> 1)];
        return kE2M1[(kk & 1) ? (byte >> 4) : (byte & 15)] * block(n, kk >> 4);
    }
#if NEMOH_AVX2
    void load16(int64_t n, int64_t kk, __m256& a, __m256& b) const {
        // the 16 codes as doubled magnitudes in int8 (exact), times half the block scale (exact halving)
        const __m128i table = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + n * (k >> 1) + (kk >> 1)));
        __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(15));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
        __m128i v = _mm_shuffle_epi8(table, _mm_unpacklo_epi8(lo, hi));     // elements 0..15 in order
        __m256 sc = _mm256_set1_ps(0.5f * block(n, kk >> 4));
        a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), sc);
        b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), sc);
    }
#endif
};

// Calls f(rows) with the reader of `w`'s format.
template <class F>
static inline void with_rows(const Weight& w, F&& f) {
    switch (w.format) {
        case NEMOH_F32: f(F32Rows{static_cast<const float*>(w.data), w.k}); break;
        case NEMOH_BF16: f(BF16Rows{static_cast<const uint16_t*>(w.data), w.k}); break;
        case NEMOH_F16: f(F16Rows{static_cast<const uint16_t*>(w.data), w.k}); break;
        case NEMOH_FP8: f(FP8Rows{static_cast<const uint8_t*>(w.data), w.k, w.scale}); break;
        default: f(NVFP4Rows{static_cast<const uint8_t*>(w.data), w.block_scale, w.k, w.scale}); break;
    }
}

}  // namespace nemoh
