// nemoh_experts: the routed experts of a LatentMoE layer for a step's rows, reading only the chosen experts'
// weights (in their stored format). The (row, expert) pairs are grouped by expert; threads take whole experts
// in turn (a shared counter), run up -> relu2 -> down on that expert's rows, and add each row's weighted output
// into their own float32 sums; the sums of all threads are added at the end and stored rounded.
#include <algorithm>
#include <atomic>

#include "panels.h"

namespace nemoh {

static void experts(const ExpertsArgs& a) {
    const int64_t R = rows_of(a.shape, a.rows), K = a.top_k, E = a.num_experts;
    if (R <= 0) return;
    const int64_t L = a.up[0].k, I = a.up[0].n;
    // pairs grouped by expert: pair_row / pair_weight in expert order, first[e] .. first[e + 1]
    std::vector<int64_t> first(E + 1, 0), pair_row(R * K);
    std::vector<float> pair_weight(R * K);
    for (int64_t i = 0; i < R * K; ++i) first[a.ids[i] + 1]++;
    for (int64_t e = 0; e < E; ++e) first[e + 1] += first[e];
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < R * K; ++i) {
        int64_t at = fill[a.ids[i]]++;
        pair_row[at] = i / K;
        pair_weight[at] = a.weights[i];
    }
    std::vector<int64_t> active;
    int64_t most = 0;
    for (int64_t e = 0; e < E; ++e)
        if (first[e + 1] > first[e]) {
            active.push_back(e);
            most = std::max(most, first[e + 1] - first[e]);
        }

    auto& pool = ThreadPool::instance();
    const int nth_total = pool.threads();
    std::vector<float*> sums(nth_total, nullptr);
    std::atomic<int64_t> next{0};
    const Epilogue relu2{nullptr, NEMOH_RELU2, a.round}, store{nullptr, NEMOH_STORE, a.round};
    // A thread that runs a second share of this call keeps adding into the sum of its first (its scratch): the
    // pool may give one thread several shares (common.h), and zeroing again would lose the first share's rows.
    static std::atomic<uint64_t> calls{0};
    const uint64_t call = calls.fetch_add(1, std::memory_order_relaxed) + 1;
    auto body = [&](int ith, int nth) {
        (void)nth;
        thread_local uint64_t summing_call = 0;
        float* mem = thread_scratch(R * L + most * (2 * L + I), 1);
        float* sum = mem;
        float* rows_in = sum + R * L;
        float* hidden = rows_in + most * L;
        float* rows_out = hidden + most * I;
        float* gemm = thread_scratch(gemm_scratch_floats(most, std::max(L, I)), 0);
        if (summing_call != call) {
            summing_call = call;
            std::fill(sum, sum + R * L, 0.f);
            sums[ith] = sum;
        }
        for (int64_t t; (t = next.fetch_add(1)) < static_cast<int64_t>(active.size());) {
            const int64_t e = active[t], b = first[e], n = first[e + 1] - b;
            for (int64_t i = 0; i < n; ++i)
                std::memcpy(rows_in + i * L, a.u + pair_row[b + i] * a.u_stride, L * sizeof(float));
            linear_range(a.up[e], rows_in, L, n, 0, I, hidden, I, relu2, gemm);
            linear_range(a.down[e], hidden, I, n, 0, L, rows_out, L, store, gemm);
            for (int64_t i = 0; i < n; ++i) {
                float* dst = sum + pair_row[b + i] * L;
                const float* src = rows_out + i * L;
                const float w = pair_weight[b + i];
                for (int64_t j = 0; j < L; ++j) dst[j] += w * src[j];
            }
        }
    };
    const bool parallel = nth_total > 1 && active.size() > 1;
    if (parallel) pool.parallel(body);
    else body(0, 1);
    const int used = parallel ? nth_total : 1;
    for (int64_t r = 0; r < R; ++r) {
        float* o = a.out + r * a.out_stride;
        for (int64_t j = 0; j < L; ++j) {
            float v = 0.f;
            for (int t = 0; t < used; ++t)
                if (sums[t]) v += sums[t][r * L + j];
            o[j] = act(v, a.round);
        }
    }
}

}  // namespace nemoh

extern "C" void nemoh_experts(const void* a) { nemoh::experts(*static_cast<const ExpertsArgs*>(a)); }
