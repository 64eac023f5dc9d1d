// The thread pool, number-format tables and the plan runner.
#include <chrono>
#include <cstdlib>

#include "common.h"

namespace nemoh {

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

ThreadPool& ThreadPool::instance() {
    static ThreadPool pool;
    return pool;
}

ThreadPool::ThreadPool() {
    // How long an idle worker keeps spinning before it sleeps (NEMOH_CPU_SPIN_US, default 300 us): long enough
    // to bridge the Python work between two engine steps, short enough that an idle server sleeps.
    const char* env = std::getenv("NEMOH_CPU_SPIN_US");
    spin_ns_ = (env ? std::atoll(env) : 300) * 1000;
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
    if (workers_.empty()) return;
    stop_.store(true);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_.store(false);
}

void ThreadPool::set_threads(int n) {
    if (n < 1) n = 1;
    if (n == nth_) return;
    stop_workers();
    nth_ = n;
    // a worker starts from the generation current now: a job posted before its thread runs is still its job
    uint32_t start = generation_.load(std::memory_order_acquire);
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, start] { worker(start); });
}

// Claim and run shares of job `generation` until none is left (or a newer job replaced it).
void ThreadPool::run_shares(uint32_t generation) {
    uint64_t c = claim_.load(std::memory_order_acquire);
    for (;;) {
        if (static_cast<uint32_t>(c >> 32) != generation || static_cast<int>(c & 0xffffffffu) >= nth_) return;
        if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        // the job cannot change before this share is counted done: fn_ and ctx_ are this job's
        fn_(ctx_, static_cast<int>(c & 0xffffffffu), nth_);
        done_.fetch_add(1, std::memory_order_acq_rel);
        done_.notify_all();
        c = claim_.load(std::memory_order_acquire);
    }
}

void ThreadPool::worker(uint32_t seen) {
    for (;;) {
        uint32_t g = generation_.load(std::memory_order_acquire);
        if (g == seen) {
            int64_t deadline = now_ns() + spin_ns_;
            int spins = 0;
            while ((g = generation_.load(std::memory_order_acquire)) == seen) {
                cpu_relax();
                if (++spins % 64 == 0 && now_ns() > deadline) {
                    sleepers_.fetch_add(1);
                    generation_.wait(seen, std::memory_order_acquire);
                    sleepers_.fetch_sub(1);
                    deadline = now_ns() + spin_ns_;
                }
            }
        }
        seen = g;
        if (stop_.load()) return;
        run_shares(g);
    }
}

void ThreadPool::run(JobFn fn, void* ctx) {
    if (nth_ == 1) {
        fn(ctx, 0, 1);
        return;
    }
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    const uint32_t g = generation_.load(std::memory_order_relaxed) + 1;
    claim_.store(static_cast<uint64_t>(g) << 32, std::memory_order_release);
    generation_.store(g, std::memory_order_release);
    if (sleepers_.load() > 0) generation_.notify_all();
    run_shares(g);
    // only shares that a worker claimed and is still running are left: wait for them, spinning briefly first
    int64_t deadline = now_ns() + spin_ns_;
    int spins = 0;
    for (int d; (d = done_.load(std::memory_order_acquire)) < nth_;) {
        if (++spins % 64 == 0 && now_ns() > deadline) done_.wait(d, std::memory_order_acquire);
        else cpu_relax();
    }
}

// ---- formats ----------------------------------------------------------------------------------------------
float f16_to_f32(uint16_t h) {
#if NEMOH_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    float f;
    if (exp == 0) {
        f = std::ldexp(static_cast<float>(mant), -24);
        return sign ? -f : f;
    }
    uint32_t u = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112) << 23) | (mant << 13));
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

uint16_t f32_to_f16_bits(float f) {
#if NEMOH_AVX2
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    // round to nearest even through the float16 grid: only used for caches on non-AVX2 machines
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    float a = std::fabs(f);
    if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
    if (a >= 65520.f) return static_cast<uint16_t>(sign | 0x7c00u);
    if (a < 6.103515625e-05f)
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.f)));
    int e;
    float m = std::frexp(a, &e);                              // a = m * 2^e, m in [0.5, 1)
    uint32_t mant = static_cast<uint32_t>(std::nearbyint((m * 2.f - 1.f) * 1024.f));
    uint32_t exp = static_cast<uint32_t>(e - 1 + 15);
    if (mant == 1024) { mant = 0; exp += 1; }
    return static_cast<uint16_t>(sign | (exp << 10) | mant);
#endif
}

uint8_t f32_to_e4m3(float f) {
    if (std::isnan(f)) return 0x7f;
    uint8_t sign = std::signbit(f) ? 0x80 : 0;
    float a = std::fabs(f);
    if (a >= 448.f) return sign | 0x7e;
    // nearest of the 127 non-negative finite values, ties to the even code
    const float* t = e4m3_table();
    int lo = 0, hi = 0x7e;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        (t[mid] <= a ? lo : hi) = mid;
    }
    float dl = a - t[lo], dh = t[hi] - a;
    int code = dl < dh ? lo : dh < dl ? hi : (lo % 2 == 0 ? lo : hi);
    return sign | static_cast<uint8_t>(code);
}

void load_floats(const void* p, int format, int64_t offset, int64_t n, float* dst) {
    int64_t i = 0;
    if (format == NEMOH_F32) {
        std::memcpy(dst, static_cast<const float*>(p) + offset, n * sizeof(float));
        return;
    }
#if NEMOH_AVX2
    const uint16_t* h = static_cast<const uint16_t*>(p) + offset;
    if (format == NEMOH_BF16)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_bf16x8(h + i));
    else if (format == NEMOH_F16)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
    for (; i < n; ++i) dst[i] = load_elem(p, format, offset + i);
}

void store_floats(void* p, int format, int64_t offset, int64_t n, const float* src) {
    if (format == NEMOH_F32) {
        std::memcpy(static_cast<float*>(p) + offset, src, n * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < n; ++i) store_elem(p, format, offset + i, src[i]);
}

void exp_inplace(float* x, int64_t n) {
    int64_t i = 0;
#if NEMOH_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
#endif
    for (; i < n; ++i) x[i] = std::exp(x[i]);
}

void silu_inplace(float* x, int64_t n) {
    int64_t i = 0;
#if NEMOH_AVX2
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, v)))));
    }
#endif
    for (; i < n; ++i) x[i] = x[i] / (1.f + std::exp(-x[i]));
}

float dot_f32(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float total = 0.f;
#if NEMOH_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    total = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; ++i) total += a[i] * b[i];
    return total;
}

}  // namespace nemoh

extern "C" {

void nemoh_run_plan(const PlanEntry* entries, int64_t n) {
    for (int64_t i = 0; i < n; ++i) entries[i].fn(entries[i].args);
}

void nemoh_run_plan_timed(const PlanEntry* entries, int64_t n, int64_t* ns) {
    for (int64_t i = 0; i < n; ++i) {
        int64_t t = nemoh::now_ns();
        entries[i].fn(entries[i].args);
        ns[i] += nemoh::now_ns() - t;
    }
}

void nemoh_set_num_threads(int32_t n) { nemoh::ThreadPool::instance().set_threads(n); }

int32_t nemoh_get_num_threads(void) { return nemoh::ThreadPool::instance().threads(); }

int32_t nemoh_abi_version(void) { return 1; }

int64_t nemoh_struct_sizes(int64_t* out, int64_t n) {
    const int64_t sizes[] = {sizeof(StepShape),   sizeof(Weight),     sizeof(LinearArgs),  sizeof(EmbedArgs),
                             sizeof(RMSNormArgs), sizeof(AddArgs),    sizeof(GatherRowsArgs), sizeof(ArgmaxArgs),
                             sizeof(RouteArgs),   sizeof(ExpertsArgs), sizeof(MambaArgs),  sizeof(AttentionArgs),
                             sizeof(PlanEntry)};
    const int64_t count = sizeof(sizes) / sizeof(sizes[0]);
    for (int64_t i = 0; i < n && i < count; ++i) out[i] = sizes[i];
    return count;
}

}
