// The small per-row operations of a step: embedding rows, RMSNorm, residual add, row gather, argmax, MoE routing.
#include <algorithm>

#include "common.h"

namespace nemoh {

// Per-row work split across threads from this many element operations in all.
static const int64_t kRowsMinWork = 16384;

template <class F>
static void for_rows(int64_t rows, int64_t work_per_row, F&& f) {
    parallel_for(rows, work_per_row, kRowsMinWork, f);
}

static void embed(const EmbedArgs& a) {
    const int64_t rows = rows_of(a.shape, a.rows);
    for_rows(rows, a.hidden, [&](int64_t r) {
        int64_t base = a.ids[r] * a.hidden;
        float* x = a.x + r * a.x_stride;
        for (int64_t i = 0; i < a.hidden; ++i) x[i] = load_elem(a.table, a.table_format, base + i);
    });
}

// torch.nn.functional.rms_norm in float32: x * rsqrt(mean(x^2) + eps) * w.
static inline void rms_row(const float* x, float* y, const float* w, int64_t n, float eps, int round) {
    double ss = 0.0;   // a double sum: the reference's float32 reduction order is not ours; this is closer
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    float inv = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
    for (int64_t i = 0; i < n; ++i) y[i] = act(x[i] * inv * w[i], round);
}

static void rmsnorm(const RMSNormArgs& a) {
    const int64_t rows = rows_of(a.shape, a.rows);
    for_rows(rows, a.hidden, [&](int64_t r) {
        rms_row(a.x + r * a.x_stride, a.y + r * a.y_stride, a.weight, a.hidden, a.eps, a.round);
    });
}

static void add(const AddArgs& a) {
    const int64_t rows = rows_of(a.shape, a.rows);
    for_rows(rows, a.width, [&](int64_t r) {
        float* x = a.x + r * a.x_stride;
        const float* v = a.a + r * a.a_stride;
        for (int64_t i = 0; i < a.width; ++i) x[i] = act(x[i] + v[i], a.round);
    });
}

static void gather_rows(const GatherRowsArgs& a) {
    const int64_t n = a.shape ? a.shape->num_seqs : a.count;
    for (int64_t i = 0; i < n; ++i)
        std::memcpy(a.y + i * a.y_stride, a.x + a.idx[i] * a.x_stride, a.width * sizeof(float));
}

static void argmax(const ArgmaxArgs& a) {
    const int64_t rows = rows_of(a.shape, a.rows);
    for_rows(rows, a.vocab, [&](int64_t r) {
        const float* l = a.logits + r * a.stride;
        int64_t best = 0;
        for (int64_t v = 1; v < a.vocab; ++v)
            if (l[v] > l[best] || (std::isnan(l[v]) && !std::isnan(l[best]))) best = v;
        a.out[r] = best;
    });
}

static void route(const RouteArgs& a) {
    const int64_t rows = rows_of(a.shape, a.rows);
    const int64_t E = a.num_experts, per_group = E / a.n_group;
    for_rows(rows, E * 8, [&](int64_t r) {
        const float* logits = a.logits + r * a.logits_stride;
        float scores[1024], choice[1024];
        float* sc = E <= 1024 ? scores : thread_scratch(2 * E, 3);
        float* ch = E <= 1024 ? choice : sc + E;
        for (int64_t e = 0; e < E; ++e) {
            sc[e] = 1.f / (1.f + std::exp(-logits[e]));
            ch[e] = sc[e] + a.bias[e];
        }
        if (a.n_group > 1) {
            // a group's score is the sum of its two best choices; experts outside the best topk_group groups
            // are excluded
            float gs[256];
            for (int64_t g = 0; g < a.n_group; ++g) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
                    if (ch[e] > b1) { b2 = b1; b1 = ch[e]; }
                    else if (ch[e] > b2) b2 = ch[e];
                }
                gs[g] = b1 + b2;
            }
            bool keep[256] = {};
            for (int64_t t = 0; t < a.topk_group; ++t) {
                int64_t best = -1;
                for (int64_t g = 0; g < a.n_group; ++g)
                    if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
                keep[best] = true;
            }
            for (int64_t g = 0; g < a.n_group; ++g)
                if (!keep[g])
                    for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) ch[e] = -INFINITY;
        }
        int32_t* ids = a.ids + r * a.top_k;
        float* w = a.weights + r * a.top_k;
        float sum = 0.f;
        for (int64_t t = 0; t < a.top_k; ++t) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; ++e) {
                bool taken = false;
                for (int64_t u = 0; u < t; ++u) taken |= ids[u] == e;
                if (!taken && (best < 0 || ch[e] > ch[best])) best = e;
            }
            ids[t] = static_cast<int32_t>(best);
            w[t] = sc[best];
            sum += w[t];
        }
        for (int64_t t = 0; t < a.top_k; ++t) {
            if (a.norm_topk) w[t] = w[t] / (sum + 1e-20f);
            w[t] *= a.scaling;
        }
    });
}

}  // namespace nemoh

extern "C" {
void nemoh_embed(const void* a) { nemoh::embed(*static_cast<const EmbedArgs*>(a)); }
void nemoh_rmsnorm(const void* a) { nemoh::rmsnorm(*static_cast<const RMSNormArgs*>(a)); }
void nemoh_add(const void* a) { nemoh::add(*static_cast<const AddArgs*>(a)); }
void nemoh_gather_rows(const void* a) { nemoh::gather_rows(*static_cast<const GatherRowsArgs*>(a)); }
void nemoh_argmax(const void* a) { nemoh::argmax(*static_cast<const ArgmaxArgs*>(a)); }
void nemoh_route(const void* a) { nemoh::route(*static_cast<const RouteArgs*>(a)); }
}
