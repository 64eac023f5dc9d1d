// nemoh_linear: y = epilogue(x @ W^T + bias) over a step's rows, every thread on its share of the features.
#include <vector>

#include "panels.h"

namespace nemoh {

// NVFP4 products of up to this many rows read the plain layout when the weight keeps it: a dot product per row
// with the block scales applied to partial sums decodes faster than the panels' per-input decode (8.4 against
// 5-6 G weights/s a core, one row).
static const int64_t kPlainNVFP4MaxRows = 2;

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
        float* scratch = M > 4 || (w.format & NEMOH_PANELS) ? thread_scratch(gemm_scratch_floats(M, w.k)) : nullptr;
        if (M <= kPlainNVFP4MaxRows && w.format == (NEMOH_NVFP4 | NEMOH_PANELS) && w.plain_data) {
            Weight plain = w;
            plain.format = NEMOH_NVFP4;
            plain.data = w.plain_data;
            plain.block_scale = w.plain_block_scale;
            plain_range(plain, a.x, a.x_stride, M, nb, ne, a.y, a.y_stride, ep, scratch);
        } else {
            linear_range(w, a.x, a.x_stride, M, nb, ne, a.y, a.y_stride, ep, scratch);
        }
    };
    if (M * w.n * w.k < kParallelMinMacs || pool.threads() == 1) body(0, 1);
    else pool.parallel(body);
}

// The panel layout (NEMOH_PANELS): element (n, k) at [n / 16][k][n % 16], zeros past n.
int64_t panel_bytes(const Weight& w, int64_t* scale_bytes) {
    const int64_t panels = (w.n + NEMOH_PANEL - 1) / NEMOH_PANEL;
    *scale_bytes = w.format == NEMOH_NVFP4 ? panels * (w.k / 16) * NEMOH_PANEL : 0;
    if (w.format == NEMOH_NVFP4) return panels * w.k * 8;
    return panels * w.k * NEMOH_PANEL * format_bytes(w.format);
}

void pack_panels(const Weight& w, void* data, void* scales) {
    const int64_t panels = (w.n + NEMOH_PANEL - 1) / NEMOH_PANEL, K = w.k;
    if (w.format == NEMOH_NVFP4) {
        const uint8_t* src = static_cast<const uint8_t*>(w.data);
        uint8_t* dst = static_cast<uint8_t*>(data);
        uint8_t* dscale = static_cast<uint8_t*>(scales);
        std::memset(dst, 0, panels * K * 8);
        std::memset(dscale, 0, panels * (K / 16) * NEMOH_PANEL);
        for (int64_t n = 0; n < w.n; ++n) {
            const int64_t p = n / NEMOH_PANEL, c = n % NEMOH_PANEL;
            for (int64_t k = 0; k < K; ++k) {
                const uint8_t byte = src[n * (K / 2) + k / 2];
                const uint8_t code = (k & 1) ? (byte >> 4) : (byte & 15);
                dst[(p * K + k) * 8 + c / 2] |= static_cast<uint8_t>((c & 1) ? code << 4 : code);
            }
            for (int64_t kb = 0; kb < K / 16; ++kb)
                dscale[(p * (K / 16) + kb) * NEMOH_PANEL + c] = w.block_scale[n * (K / 16) + kb];
        }
        return;
    }
    const int64_t eb = format_bytes(w.format);
    const char* src = static_cast<const char*>(w.data);
    char* dst = static_cast<char*>(data);
    std::memset(dst, 0, panels * K * NEMOH_PANEL * eb);
    for (int64_t n = 0; n < w.n; ++n) {
        const int64_t p = n / NEMOH_PANEL, c = n % NEMOH_PANEL;
        for (int64_t k = 0; k < K; ++k)
            std::memcpy(dst + ((p * K + k) * NEMOH_PANEL + c) * eb, src + (n * K + k) * eb, eb);
    }
}

}  // namespace nemoh

extern "C" {
void nemoh_linear(const void* args) { nemoh::linear(*static_cast<const LinearArgs*>(args)); }
int64_t nemoh_panel_bytes(const Weight* w, int64_t* scale_bytes) { return nemoh::panel_bytes(*w, scale_bytes); }
void nemoh_pack_panels(const Weight* w, void* data, void* scales) { nemoh::pack_panels(*w, data, scales); }
}
