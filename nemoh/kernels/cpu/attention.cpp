// nemoh_attention: causal grouped-query attention of a step's rows over the paged KV cache, never building a
// (query x context) matrix. Work item = (sequence, KV head): the q rows of the sequence times the KV head's
// query heads walk the sequence's keys together, kChunk at a time, so each key and value is read once per step,
// with an online softmax (running max and sum per query) and memory of one chunk at a time.
#include <algorithm>

#include "gemm.h"

namespace nemoh {

// Keys of one online-softmax update; a chunk spans several cache blocks.
static const int64_t kChunk = 64;

#if NEMOH_AVX2
using float8 = __m256;
#endif

// Keys and values of a chunk read where they lie: a float32 or bfloat16 cache (T = float / uint16_t), or a float32
// copy (float16 and fp8 caches are converted chunk by chunk first). D: the head dimension when it is known at
// compile time (64, 128: a key stays in registers), else 0 and `dim` is read at run time.
template <class T, int D>
struct KeyRows {
    const T* k;
    const T* v;
    int64_t dim;

    static float to_float(float x) { return x; }
    static float to_float(uint16_t x) { return bf16_to_f32(x); }
#if NEMOH_AVX2
    static __m256 load(const T* p) {
        if constexpr (std::is_same_v<T, uint16_t>) return load_bf16x8(p);
        else return _mm256_loadu_ps(p);
    }
#endif

    // out[r * stride] = queries[r] . key row at element offset `at`, for r < R
    void scores(const float* queries, int64_t R, int64_t at, float* out, int64_t stride) const {
#if NEMOH_AVX2
        if constexpr (D > 0) {
            __m256 key[D / 8];
            for (int d = 0; d < D / 8; ++d) key[d] = load(k + at + 8 * d);
            for (int64_t r = 0; r < R; ++r) {
                const float* qr = queries + r * D;
                __m256 s0 = _mm256_mul_ps(key[0], _mm256_loadu_ps(qr)), s1 = _mm256_setzero_ps();
                for (int d = 1; d < D / 8; d += 2) {
                    s1 = _mm256_fmadd_ps(key[d], _mm256_loadu_ps(qr + 8 * d), s1);
                    if (d + 1 < D / 8) s0 = _mm256_fmadd_ps(key[d + 1], _mm256_loadu_ps(qr + 8 * d + 8), s0);
                }
                out[r * stride] = hsum(_mm256_add_ps(s0, s1));
            }
            return;
        }
#endif
        for (int64_t r = 0; r < R; ++r) {
            float sum = 0.f;
            for (int64_t d = 0; d < dim; ++d) sum += queries[r * dim + d] * to_float(k[at + d]);
            out[r * stride] = sum;
        }
    }

    // acc[r] += sum_t p[r * stride + t] * value row at[t], for r < R and t < n
    void accumulate(const float* p, int64_t stride, int64_t R, int64_t n, const int64_t* at, float* acc) const {
#if NEMOH_AVX2
        if constexpr (D > 0) {
            for (int64_t r0 = 0; r0 < R; r0 += 4) {          // 4 rows x 16 columns of the sums in registers
                const int64_t rows = std::min<int64_t>(4, R - r0);
                for (int d = 0; d < D; d += 16) {
                    __m256 lo[4], hi[4];
                    for (int64_t r = 0; r < rows; ++r) {
                        lo[r] = _mm256_loadu_ps(acc + (r0 + r) * D + d);
                        hi[r] = _mm256_loadu_ps(acc + (r0 + r) * D + d + 8);
                    }
                    for (int64_t t = 0; t < n; ++t) {
                        const __m256 v0 = load(v + at[t] + d), v1 = load(v + at[t] + d + 8);
                        for (int64_t r = 0; r < rows; ++r) {
                            const __m256 pt = _mm256_set1_ps(p[(r0 + r) * stride + t]);
                            lo[r] = _mm256_fmadd_ps(pt, v0, lo[r]);
                            hi[r] = _mm256_fmadd_ps(pt, v1, hi[r]);
                        }
                    }
                    for (int64_t r = 0; r < rows; ++r) {
                        _mm256_storeu_ps(acc + (r0 + r) * D + d, lo[r]);
                        _mm256_storeu_ps(acc + (r0 + r) * D + d + 8, hi[r]);
                    }
                }
            }
            return;
        }
#endif
        for (int64_t t = 0; t < n; ++t)
            for (int64_t r = 0; r < R; ++r) {
                const float pt = p[r * stride + t];
                for (int64_t d = 0; d < dim; ++d) acc[r * dim + d] += pt * to_float(v[at[t] + d]);
            }
    }
};

// f(rows) with the key reader specialised for the head dimension where that is possible
template <class T, class F>
static void with_head_dim(const T* k, const T* v, int64_t dim, F&& f) {
    if (dim == 64) f(KeyRows<T, 64>{k, v, dim});
    else if (dim == 128) f(KeyRows<T, 128>{k, v, dim});
    else f(KeyRows<T, 0>{k, v, dim});
}

static void attention(const AttentionArgs& a) {
    const int64_t rows = a.shape->num_rows, num_seqs = a.shape->num_seqs, q = a.q;
    const int64_t H = a.num_heads, KVH = a.num_kv_heads, D = a.head_dim, group = H / KVH, bs = a.block_size;
    const int64_t kv_width = KVH * D, R = q * group;
    const bool fp8 = a.cache_format == NEMOH_FP8;

    // 1. this step's keys and values into the cache, rounded to its dtype (fp8: divided by the scale)
    for (int64_t r = 0; r < rows; ++r) {
        const float* k = a.qkv + r * a.qkv_stride + H * D;
        const float* v = k + kv_width;
        const int64_t base = a.slot_mapping[r] * kv_width;
        if (fp8) {
            for (int64_t i = 0; i < kv_width; ++i) {
                store_elem(a.k_cache, a.cache_format, base + i, k[i] / a.k_scale);
                store_elem(a.v_cache, a.cache_format, base + i, v[i] / a.v_scale);
            }
        } else {
            store_floats(a.k_cache, a.cache_format, base, kv_width, k);
            store_floats(a.v_cache, a.cache_format, base, kv_width, v);
        }
    }

    // 2. one (sequence, KV head): R = q x group queries against the sequence's keys, kChunk at a time
    auto item = [&](int64_t it) {
        const int64_t s = it / KVH, g = it % KVH;
        const int32_t* table = a.block_tables + s * a.max_blocks;
        const int64_t* pos = a.positions + s * q;               // row j sees keys 0 .. pos[j]
        const int64_t kv_len = pos[q - 1] + 1;
        float* mem = thread_scratch(2 * kChunk * D + R * (2 * D + kChunk + 2), 2);
        float* keys = mem;                                      // a chunk converted (float16 / fp8 caches)
        float* values = keys + kChunk * D;
        float* queries = values + kChunk * D;                   // (R, D), scaled by sm_scale
        float* acc = queries + R * D;                           // (R, D)
        float* scores = acc + R * D;                            // (R, kChunk)
        float* run_max = scores + R * kChunk;
        float* run_sum = run_max + R;
        int64_t rows_at[kChunk], converted_at[kChunk];         // element offset of each key row of the chunk
        for (int64_t j = 0; j < q; ++j)
            for (int64_t i = 0; i < group; ++i) {
                const float* src = a.qkv + (s * q + j) * a.qkv_stride + (g * group + i) * D;
                float* dst = queries + (j * group + i) * D;
                for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * a.sm_scale;
            }
        std::fill(acc, acc + R * D, 0.f);
        std::fill(run_max, run_max + R, -INFINITY);
        std::fill(run_sum, run_sum + R, 0.f);

        // the online-softmax update of every query row with the chunk's scores (R, n) at key positions start..
        auto softmax_update = [&](int64_t start, int64_t n) {
            for (int64_t r = 0; r < R; ++r) {
                const int64_t visible = std::min(n, pos[r / group] + 1 - start);   // causal within the step
                float* sc = scores + r * kChunk;
                if (visible <= 0) {
                    std::fill(sc, sc + n, 0.f);
                    continue;
                }
                float block_max = -INFINITY;
                for (int64_t t = 0; t < visible; ++t) block_max = std::max(block_max, sc[t]);
                const float new_max = std::max(run_max[r], block_max);
                const float rescale = std::exp(run_max[r] - new_max);       // 0 on the first chunk
                if (rescale != 1.f)
                    for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= rescale;
                for (int64_t t = 0; t < visible; ++t) sc[t] -= new_max;
                exp_inplace(sc, visible);
                std::fill(sc + visible, sc + n, 0.f);                       // keys this row may not see
                float sum = 0.f;
                for (int64_t t = 0; t < visible; ++t) sum += sc[t];
                run_sum[r] = run_sum[r] * rescale + sum;
                run_max[r] = new_max;
            }
        };
        auto chunk = [&](const auto& kr, int64_t start, int64_t n, const int64_t* at) {
            for (int64_t t = 0; t < n; ++t) kr.scores(queries, R, at[t], scores + t, kChunk);
            softmax_update(start, n);
            kr.accumulate(scores, kChunk, R, n, at, acc);                  // acc += P . V
        };

        for (int64_t start = 0; start < kv_len; start += kChunk) {
            const int64_t n = std::min(kChunk, kv_len - start);
            for (int64_t t = 0; t < n;) {                       // block by block: one table lookup per block
                const int64_t p = start + t, block = table[p / bs], in_block = p % bs;
                const int64_t run = std::min(n - t, bs - in_block);
                for (int64_t i = 0; i < run; ++i) rows_at[t + i] = ((block * bs + in_block + i) * KVH + g) * D;
                t += run;
            }
            if (a.cache_format == NEMOH_F32) {
                with_head_dim(static_cast<const float*>(a.k_cache), static_cast<const float*>(a.v_cache), D,
                              [&](const auto& kr) { chunk(kr, start, n, rows_at); });
            } else if (a.cache_format == NEMOH_BF16) {
                with_head_dim(static_cast<const uint16_t*>(a.k_cache), static_cast<const uint16_t*>(a.v_cache), D,
                              [&](const auto& kr) { chunk(kr, start, n, rows_at); });
            } else {                                            // float16 / fp8: converted to float32 first
                for (int64_t t = 0; t < n; ++t) {
                    load_floats(a.k_cache, a.cache_format, rows_at[t], D, keys + t * D);
                    load_floats(a.v_cache, a.cache_format, rows_at[t], D, values + t * D);
                    if (fp8)
                        for (int64_t d = 0; d < D; ++d) {
                            keys[t * D + d] *= a.k_scale;
                            values[t * D + d] *= a.v_scale;
                        }
                    converted_at[t] = t * D;
                }
                with_head_dim(static_cast<const float*>(keys), static_cast<const float*>(values), D,
                              [&](const auto& kr) { chunk(kr, start, n, converted_at); });
            }
        }
        for (int64_t j = 0; j < q; ++j)
            for (int64_t i = 0; i < group; ++i) {
                const int64_t r = j * group + i;
                float* o = a.out + (s * q + j) * a.out_stride + (g * group + i) * D;
                const float inv = 1.f / run_sum[r];
                for (int64_t d = 0; d < D; ++d) o[d] = act(acc[r * D + d] * inv, a.round);
            }
    };
    auto& pool = ThreadPool::instance();
    const int64_t items = num_seqs * KVH;
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; ++r) longest = std::max(longest, a.positions[r] + 1);
    if (items < 2 || pool.threads() == 1 || items * longest * D * R < 32768) {
        for (int64_t it = 0; it < items; ++it) item(it);
        return;
    }
    auto body = [&](int ith, int nth) {
        for (int64_t it = ith; it < items; it += nth) item(it);
    };
    pool.parallel(body);
}

}  // namespace nemoh

extern "C" void nemoh_attention(const void* a) { nemoh::attention(*static_cast<const AttentionArgs*>(a)); }
