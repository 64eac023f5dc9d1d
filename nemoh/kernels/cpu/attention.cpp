// nemoh_attention: causal grouped-query attention of a step's rows over the paged KV cache, never building a
// (query x context) matrix. Work item = (sequence, KV head): the q rows of the sequence times the KV head's
// query heads walk the sequence's blocks together, so each block of keys and values is read and converted once
// per step, with an online softmax (running max and sum per query) and memory of one block at a time.
#include <algorithm>

#include "gemm.h"

namespace nemoh {

// acc[0:D] += p * v[0:D]
static inline void axpy(float* acc, float p, const float* v, int64_t D) {
    int64_t d = 0;
#if NEMOH_AVX2
    const __m256 vp = _mm256_set1_ps(p);
    for (; d + 8 <= D; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + d), _mm256_loadu_ps(acc + d)));
#endif
    for (; d < D; ++d) acc[d] += p * v[d];
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

    // 2. one (sequence, KV head): R = q x group queries against the sequence's keys, block by block
    auto item = [&](int64_t it) {
        const int64_t s = it / KVH, g = it % KVH;
        const int32_t* table = a.block_tables + s * a.max_blocks;
        const int64_t* pos = a.positions + s * q;               // row j sees keys 0 .. pos[j]
        const int64_t kv_len = pos[q - 1] + 1;
        float* mem = thread_scratch(2 * bs * D + R * (2 * D + bs + 2), 2);
        float* keys = mem;
        float* values = keys + bs * D;
        float* queries = values + bs * D;                       // (R, D), scaled by sm_scale
        float* acc = queries + R * D;                           // (R, D)
        float* scores = acc + R * D;                            // (R, bs)
        float* run_max = scores + R * bs;
        float* run_sum = run_max + R;
        for (int64_t j = 0; j < q; ++j)
            for (int64_t i = 0; i < group; ++i) {
                const float* src = a.qkv + (s * q + j) * a.qkv_stride + (g * group + i) * D;
                float* dst = queries + (j * group + i) * D;
                for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * a.sm_scale;
            }
        std::fill(acc, acc + R * D, 0.f);
        std::fill(run_max, run_max + R, -INFINITY);
        std::fill(run_sum, run_sum + R, 0.f);
        for (int64_t start = 0; start < kv_len; start += bs) {
            const int64_t n = std::min(bs, kv_len - start);
            const int64_t block = table[start / bs];
            for (int64_t t = 0; t < n; ++t) {
                const int64_t off = ((block * bs + t) * KVH + g) * D;
                load_floats(a.k_cache, a.cache_format, off, D, keys + t * D);
                load_floats(a.v_cache, a.cache_format, off, D, values + t * D);
                if (fp8)
                    for (int64_t d = 0; d < D; ++d) {
                        keys[t * D + d] *= a.k_scale;
                        values[t * D + d] *= a.v_scale;
                    }
            }
            // scores (R, n) = queries . keys, register-blocked
            std::fill(scores, scores + R * bs, 0.f);
            for (int64_t r0 = 0; r0 < R; r0 += 4) {
                const int64_t mt = std::min<int64_t>(4, R - r0);
                const float* qr = queries + r0 * D;
                float* sr = scores + r0 * bs;
                if (mt == 4) f32_tiles_n<4>(keys, D, n, qr, D, D, sr, bs);
                else if (mt == 3) f32_tiles_n<3>(keys, D, n, qr, D, D, sr, bs);
                else if (mt == 2) f32_tiles_n<2>(keys, D, n, qr, D, D, sr, bs);
                else f32_tiles_n<1>(keys, D, n, qr, D, D, sr, bs);
            }
            for (int64_t r = 0; r < R; ++r) {
                const int64_t visible = std::min(n, pos[r / group] + 1 - start);   // causal within the step
                if (visible <= 0) continue;
                float* sc = scores + r * bs;
                float block_max = -INFINITY;
                for (int64_t t = 0; t < visible; ++t) block_max = std::max(block_max, sc[t]);
                const float new_max = std::max(run_max[r], block_max);
                const float rescale = std::exp(run_max[r] - new_max);       // 0 on the first block
                float* ar = acc + r * D;
                if (rescale != 1.f)
                    for (int64_t d = 0; d < D; ++d) ar[d] *= rescale;
                for (int64_t t = 0; t < visible; ++t) sc[t] -= new_max;
                exp_inplace(sc, visible);
                float sum = 0.f;
                for (int64_t t = 0; t < visible; ++t) {
                    sum += sc[t];
                    axpy(ar, sc[t], values + t * D, D);
                }
                run_sum[r] = run_sum[r] * rescale + sum;
                run_max[r] = new_max;
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
