// nemoh_mamba: the Mamba-2 mixer between in_proj and out_proj for a step of q new tokens per sequence, numbered
// as REFERENCE §1 and nemoh/models/mamba2.py: 2. causal conv1d over xBC continuing the cached window, SiLU;
// 3. dt = softplus(dt + dt_bias) clamped; 4. h = exp(dt A) h + dt x B^T, y = h C + D x; 5. gated group RMSNorm.
#include <algorithm>

#include "common.h"

namespace nemoh {

// torch.nn.functional.softplus (beta 1, threshold 20)
static inline float softplus(float v) { return v > 20.f ? v : std::log1p(std::exp(v)); }

// One row of a head's state: s = s * decay + xdt * B, then returns s . C (one pass over the row).
static inline float ssm_row(float* s, const float* B, const float* C, int64_t N, float decay, float xdt) {
    int64_t n = 0;
    float y = 0.f;
#if NEMOH_AVX2
    const __m256 vd = _mm256_set1_ps(decay), vx = _mm256_set1_ps(xdt);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; n + 16 <= N; n += 16) {
        __m256 s0 = _mm256_fmadd_ps(_mm256_loadu_ps(s + n), vd, _mm256_mul_ps(vx, _mm256_loadu_ps(B + n)));
        __m256 s1 = _mm256_fmadd_ps(_mm256_loadu_ps(s + n + 8), vd, _mm256_mul_ps(vx, _mm256_loadu_ps(B + n + 8)));
        _mm256_storeu_ps(s + n, s0);
        _mm256_storeu_ps(s + n + 8, s1);
        acc0 = _mm256_fmadd_ps(s0, _mm256_loadu_ps(C + n), acc0);
        acc1 = _mm256_fmadd_ps(s1, _mm256_loadu_ps(C + n + 8), acc1);
    }
    y = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; n < N; ++n) {
        s[n] = s[n] * decay + xdt * B[n];
        y += s[n] * C[n];
    }
    return y;
}

static inline float to_float(float v) { return v; }
static inline float to_float(uint16_t v) { return bf16_to_f32(v); }
static inline void from_float(float& d, float v) { d = v; }
static inline void from_float(uint16_t& d, float v) { d = f32_to_bf16_bits(v); }

// Kernel-width-4 conv of sequence s's q rows (pre-activation into xbc), its window (conv_dim, 3) in place.
// With `saved` set (a verification), the window after each row is also written to saved (q, conv_dim, 3).
template <class T>
static void conv4_rows(T* cache, T* saved, const MambaArgs& a, int64_t s, int64_t q, int64_t conv_dim,
                       int64_t d_inner) {
    for (int64_t j = 0; j < q; ++j) {
        const int64_t r = s * q + j;
        const float* v = a.proj + r * a.proj_stride + d_inner;
        float* out = a.xbc + r * conv_dim;
        T* keep = saved ? saved + j * conv_dim * 3 : nullptr;
        for (int64_t c = 0; c < conv_dim; ++c) {
            T* st = cache + c * 3;
            const float* w = a.conv_weight + c * 4;
            const float s0 = to_float(st[0]), s1 = to_float(st[1]), s2 = to_float(st[2]), x = v[c];
            out[c] = (a.conv_bias ? a.conv_bias[c] : 0.f) + s0 * w[0] + s1 * w[1] + s2 * w[2] + x * w[3];
            st[0] = st[1];
            st[1] = st[2];
            from_float(st[2], x);
            if (keep) {
                keep[c * 3] = st[0];
                keep[c * 3 + 1] = st[1];
                keep[c * 3 + 2] = st[2];
            }
        }
    }
}

// Items (sequences, heads, rows) split across threads from this many element operations in all.
static const int64_t kMinWork = 65536;

template <class F>
static void parallel_items(int64_t items, int64_t work_per_item, F&& f) {
    parallel_for(items, work_per_item, kMinWork, f);
}

static void mamba(const MambaArgs& a) {
    const int64_t num_seqs = a.shape->num_seqs, q = a.q;
    const int64_t H = a.num_heads, P = a.head_dim, G = a.n_groups, N = a.state_size, K = a.conv_kernel;
    const int64_t d_inner = H * P, conv_dim = d_inner + 2 * G * N, K1 = K - 1;
    const int64_t heads_per_group = H / G;
    const float* proj = a.proj;

    // 2. the conv, channel by channel (each channel's window moves on by q inputs), then SiLU over each row
    parallel_items(num_seqs, conv_dim * q * K, [&](int64_t s) {
        const int64_t slot = a.slots[s];
        if (K == 4 && (a.conv_format == NEMOH_F32 || a.conv_format == NEMOH_BF16)) {
            // Nemotron's kernel width, a float32 or bfloat16 window updated in place: straight-line code
            const int64_t cache_at = slot * conv_dim * 3, saved_at = s * q * conv_dim * 3;
            if (a.conv_format == NEMOH_F32)
                conv4_rows(static_cast<float*>(a.conv_cache) + cache_at,
                           a.saved_conv ? static_cast<float*>(a.saved_conv) + saved_at : nullptr, a, s, q, conv_dim,
                           d_inner);
            else
                conv4_rows(static_cast<uint16_t*>(a.conv_cache) + cache_at,
                           a.saved_conv ? static_cast<uint16_t*>(a.saved_conv) + saved_at : nullptr, a, s, q,
                           conv_dim, d_inner);
        } else {
            float window[16];
            for (int64_t c = 0; c < conv_dim; ++c) {
                const int64_t base = (slot * conv_dim + c) * K1;
                load_floats(a.conv_cache, a.conv_format, base, K1, window);
                const float* w = a.conv_weight + c * K;
                for (int64_t j = 0; j < q; ++j) {
                    const int64_t r = s * q + j;
                    const float v = proj[r * a.proj_stride + d_inner + c];
                    float acc = a.conv_bias ? a.conv_bias[c] : 0.f;
                    for (int64_t t = 0; t < K1; ++t) acc += window[t] * w[t];
                    a.xbc[r * conv_dim + c] = acc + v * w[K1];
                    for (int64_t t = 0; t + 1 < K1; ++t) window[t] = window[t + 1];
                    window[K1 - 1] = v;
                    if (a.saved_conv)
                        store_floats(a.saved_conv, a.conv_format, ((s * q + j) * conv_dim + c) * K1, K1, window);
                }
                store_floats(a.conv_cache, a.conv_format, base, K1, window);
            }
        }
        for (int64_t j = 0; j < q; ++j) {
            float* xr = a.xbc + (s * q + j) * conv_dim;
            if (a.round)
                for (int64_t c = 0; c < conv_dim; ++c) xr[c] = act(xr[c], a.round);
            silu_inplace(xr, conv_dim);
            if (a.round)
                for (int64_t c = 0; c < conv_dim; ++c) xr[c] = act(xr[c], a.round);
        }
    });

    // 3.-4. the recurrence, head by head; y (before the norm) goes to a.y
    parallel_items(num_seqs * H, q * P * N * 4, [&](int64_t item) {
        const int64_t s = item / H, h = item % H, g = h / heads_per_group;
        const int64_t slot = a.slots[s];
        const int64_t sbase = (slot * H + h) * P * N;
        // a float32 state is advanced where it lies; another dtype through a float32 copy
        const bool in_place = a.ssm_format == NEMOH_F32;
        float* state = in_place ? static_cast<float*>(a.ssm_cache) + sbase : thread_scratch(P * N, 1);
        if (!in_place) load_floats(a.ssm_cache, a.ssm_format, sbase, P * N, state);
        for (int64_t j = 0; j < q; ++j) {
            const int64_t r = s * q + j;
            const float* xr = a.xbc + r * conv_dim;
            const float* x = xr + h * P;
            const float* B = xr + d_inner + g * N;
            const float* C = xr + d_inner + G * N + g * N;
            float dt = softplus(proj[r * a.proj_stride + d_inner + conv_dim + h] + a.dt_bias[h]);
            dt = std::min(std::max(dt, a.dt_min), a.dt_max);
            const float decay = std::exp(dt * a.A[h]);
            float* y = a.y + r * a.y_stride + h * P;
            for (int64_t p = 0; p < P; ++p) y[p] = ssm_row(state + p * N, B, C, N, decay, x[p] * dt) + a.D[h] * x[p];
            if (a.saved_ssm) store_floats(a.saved_ssm, a.ssm_format, ((s * q + j) * H + h) * P * N, P * N, state);
        }
        if (!in_place) store_floats(a.ssm_cache, a.ssm_format, sbase, P * N, state);
    });

    // 5. y * silu(z), RMS-normalised per group of d_inner / G, times the weight
    const int64_t gs = d_inner / G;
    parallel_items(num_seqs * q, d_inner * 16, [&](int64_t r) {
        float* y = a.y + r * a.y_stride;
        float* gate = thread_scratch(d_inner, 1);
        std::memcpy(gate, proj + r * a.proj_stride, d_inner * sizeof(float));
        silu_inplace(gate, d_inner);
        for (int64_t i = 0; i < d_inner; ++i) y[i] *= gate[i];
        for (int64_t g = 0; g < G; ++g) {
            float* yg = y + g * gs;
            const float inv = 1.f / std::sqrt(dot_f32(yg, yg, gs) / gs + a.eps);
            const float* wg = a.norm_weight + g * gs;
            for (int64_t i = 0; i < gs; ++i) yg[i] = act(wg[i] * act(yg[i] * inv, a.round), a.round);
        }
    });
}

}  // namespace nemoh

extern "C" void nemoh_mamba(const void* a) { nemoh::mamba(*static_cast<const MambaArgs*>(a)); }
