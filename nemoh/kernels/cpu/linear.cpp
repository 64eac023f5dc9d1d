// nemoh_linear: y = epilogue(x @ W^T + bias) over a step's rows, every thread on its share of the features.
#include <vector>

#include "gemm.h"

namespace nemoh {

// Below this many multiply-adds a call runs on one thread: waking the others costs more than it saves.
static const int64_t kParallelMinMacs = 32768;

// Per-thread working memory that grows as needed and is kept for the next call; `slot` tells apart buffers a
// kernel needs at the same time.
float* thread_scratch(int64_t floats, int slot) {
    static thread_local std::vector<float> bufs[4];
    auto& buf = bufs[slot];
    if (static_cast<int64_t>(buf.size()) < floats) buf.resize(floats);
    return buf.data();
}

void linear(const LinearArgs& a) {
    const int64_t M = rows_of(a.shape, a.rows);
    if (M <= 0) return;
    const Weight& w = a.w;
    Epilogue ep{w.bias, a.epilogue, a.round};
    auto& pool = ThreadPool::instance();
    auto body = [&](int ith, int nth) {
        int64_t nb, ne;
        split_range(w.n, ith, nth, 16, &nb, &ne);
        if (nb >= ne) return;
        float* scratch = M > 4 ? thread_scratch(gemm_scratch_floats(M)) : nullptr;
        linear_range(w, a.x, a.x_stride, M, nb, ne, a.y, a.y_stride, ep, scratch);
    };
    if (M * w.n * w.k < kParallelMinMacs || pool.threads() == 1) body(0, 1);
    else pool.parallel(body);
}

}  // namespace nemoh

extern "C" void nemoh_linear(const void* args) { nemoh::linear(*static_cast<const LinearArgs*>(args)); }
