// Internal helpers of the native CPU kernels: the thread pool, number formats, small vector helpers.
#pragma once
#include <atomic>
#include <bit>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define NEMOH_AVX2 1
#include <immintrin.h>
#else
#define NEMOH_AVX2 0
#endif

#include "nemoh_cpu.h"

namespace nemoh {

// ---- thread pool ------------------------------------------------------------------------------------------
// One pool for the whole process: the calling thread plus (threads - 1) workers. A job is split into `threads`
// shares, fn(ctx, i, n) for i < n; the caller and the workers claim shares from a counter, so a share runs on
// whichever thread gets to it first and the job returns when every share is done. On a machine with more
// runnable threads than cores a worker is often not running when a job is posted: then the caller runs its
// share too instead of waiting a scheduler time slice for it (measured on 2 shared cores at load 6: a decode
// step of 32 sequences 0.8 s with fixed shares, see docs/reliability.md). A share must therefore not assume
// which thread runs it, nor that one thread runs only one share of a job. Between jobs a worker spins for a
// while (the next kernel of a step follows within microseconds) and then sleeps until woken, so an idle engine
// costs no CPU; the caller waiting for a share a worker is running also spins only that long, then sleeps.
using JobFn = void (*)(void* ctx, int ith, int nth);

class ThreadPool {
  public:
    static ThreadPool& instance();
    void set_threads(int n);
    int threads() const { return nth_; }
    void run(JobFn fn, void* ctx);

    template <class F>
    void parallel(F& f) {
        run([](void* c, int i, int n) { (*static_cast<F*>(c))(i, n); }, &f);
    }

  private:
    ThreadPool();
    ~ThreadPool();
    void stop_workers();
    void worker(uint32_t seen);
    void run_shares(uint32_t generation);
    std::vector<std::thread> workers_;
    std::atomic<uint32_t> generation_{0};
    // (generation << 32) | next unclaimed share: a claim is valid only in the generation it was made in
    std::atomic<uint64_t> claim_{0};
    std::atomic<int> done_{0};
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stop_{false};
    JobFn fn_ = nullptr;
    void* ctx_ = nullptr;
    int nth_ = 1;
    int64_t spin_ns_;
};

// f(i) for i < items, split across the pool's threads in contiguous shares when there is enough work
// (items * work_per_item of at least min_work) to pay for waking the other threads.
template <class F>
static void parallel_for(int64_t items, int64_t work_per_item, int64_t min_work, F&& f);

// [begin, end) of thread ith's share of n items, shares aligned to `align` items.
static inline void split_range(int64_t n, int ith, int nth, int64_t align, int64_t* begin, int64_t* end) {
    int64_t units = (n + align - 1) / align;
    int64_t per = units / nth, extra = units % nth;
    int64_t b = ith * per + (ith < extra ? ith : extra);
    int64_t e = b + per + (ith < extra ? 1 : 0);
    *begin = b * align < n ? b * align : n;
    *end = e * align < n ? e * align : n;
}

template <class F>
static void parallel_for(int64_t items, int64_t work_per_item, int64_t min_work, F&& f) {
    auto& pool = ThreadPool::instance();
    if (items * work_per_item < min_work || items < 2 || pool.threads() == 1) {
        for (int64_t i = 0; i < items; ++i) f(i);
        return;
    }
    auto body = [&](int ith, int nth) {
        int64_t b, e;
        split_range(items, ith, nth, 1, &b, &e);
        for (int64_t i = b; i < e; ++i) f(i);
    };
    pool.parallel(body);
}

// ---- number formats ---------------------------------------------------------------------------------------
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to the nearest bfloat16 (ties to even), as PyTorch's float -> bfloat16 cast does; NaN stays NaN.
static inline float round_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16_bits(float f) {
    f = round_bf16(f);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);
}

// float8_e4m3fn -> float32 by table: kE4M3[byte].
constexpr float e4m3_value(int b) {
    int exp = (b >> 3) & 0xf, mant = b & 7;
    float v = exp == 0xf && mant == 7 ? std::numeric_limits<float>::quiet_NaN()
              : exp == 0 ? static_cast<float>(mant) / 512.f
                         : std::bit_cast<float>(static_cast<uint32_t>((exp - 7 + 127) << 23 | mant << 20));
    return b & 0x80 ? -v : v;
}
struct E4M3Table {
    float v[256];
    constexpr E4M3Table() : v() {
        for (int i = 0; i < 256; ++i) v[i] = e4m3_value(i);
    }
};
inline constexpr E4M3Table kE4M3Table{};
static inline const float* e4m3_table() { return kE4M3Table.v; }
// float32 -> float8_e4m3fn, round to nearest even, saturating at +-448 (PyTorch's cast after a clamp).
uint8_t f32_to_e4m3(float f);

// E2M1 magnitudes doubled (integers), indexed by a 4-bit code: bit 3 is the sign.
static const float kE2M1[16] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16_bits(float f);

// One stored activation value, rounded as the model's dtype stores it (NEMOH_ROUND_*).
static inline float act(float v, int round) {
    if (round == NEMOH_ROUND_BF16) return round_bf16(v);
    if (round == NEMOH_ROUND_F16) return f16_to_f32(f32_to_f16_bits(v));
    return v;
}

// A kernel's row count: `rows` without a step shape; with one, the step's rows, or its sequences when `rows` is
// NEMOH_PER_SEQUENCE (the LM head of a plan that keeps one row per sequence).
static inline int64_t rows_of(const StepShape* shape, int64_t rows) {
    if (!shape) return rows;
    return rows == NEMOH_PER_SEQUENCE ? shape->num_seqs : shape->num_rows;
}

float* thread_scratch(int64_t floats, int slot = 0);
int64_t now_ns();

// Read element i of a cache or weight buffer of `format` (F32 / BF16 / F16 / FP8 without scale) as float.
static inline float load_elem(const void* p, int format, int64_t i) {
    switch (format) {
        case NEMOH_F32: return static_cast<const float*>(p)[i];
        case NEMOH_BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
        case NEMOH_F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
        default: return e4m3_table()[static_cast<const uint8_t*>(p)[i]];
    }
}

static inline void store_elem(void* p, int format, int64_t i, float v) {
    switch (format) {
        case NEMOH_F32: static_cast<float*>(p)[i] = v; break;
        case NEMOH_BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16_bits(v); break;
        case NEMOH_F16: static_cast<uint16_t*>(p)[i] = f32_to_f16_bits(v); break;
        default: static_cast<uint8_t*>(p)[i] = f32_to_e4m3(v); break;
    }
}

// n consecutive elements of a buffer of `format` from / to float32 (vectorised for the 16-bit formats).
void load_floats(const void* p, int format, int64_t offset, int64_t n, float* dst);
void store_floats(void* p, int format, int64_t offset, int64_t n, const float* src);

static inline int64_t format_bytes(int format) {
    return format == NEMOH_F32 ? 4 : (format == NEMOH_BF16 || format == NEMOH_F16) ? 2 : 1;
}

// sum_i a[i] * b[i] in float32 (8 partial sums, then a final reduction).
float dot_f32(const float* a, const float* b, int64_t n);
// x[i] = exp(x[i]); x[i] = silu(x[i]) = x[i] / (1 + exp(-x[i])); vectorised.
void exp_inplace(float* x, int64_t n);
void silu_inplace(float* x, int64_t n);

#if NEMOH_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
// exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n into the
// exponent; within 2 ulp of expf over its whole range, 0 below -87.3 and inf above 88.7.
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.7228f), lo = _mm256_set1_ps(-87.3365f);
    __m256 big = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
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
    // 2^n in two halves so that n = 128 (x near the top of the range) does not overflow the exponent
    __m256i e = _mm256_cvtps_epi32(n);
    __m256i e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, _mm256_set1_epi32(127)), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), big);
    return _mm256_blendv_ps(y, _mm256_setzero_ps(), small);
}

static inline __m256 load_bf16x8(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// Eight float8_e4m3fn bytes -> float32 / 256 (exact): the byte's exponent and mantissa shifted into a float16
// whose exponent bias is 8 larger, so the caller folds 256 into its scale. (0x7f / 0xff, NaN in e4m3fn, read
// as 480 / -480; weights hold no NaN.)
static inline __m256 load_e4m3x8_div256(const uint8_t* p) {
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                             _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
    return _mm256_cvtph_ps(h);
}
#endif

}  // namespace nemoh
