// nemoh's native CPU kernels: the C ABI shared with nemoh/kernels/cpu_library.py (ctypes mirrors every struct
// below field for field; change both together).
//
// Every kernel takes one pointer to its argument struct, so that a step can be replayed as a list of
// (kernel, arguments) pairs without Python in between (nemoh_run_plan). Activations are float32 rows; a row
// count that changes from step to step is read through `const StepShape*`, so one plan serves any batch up to
// the capacity its buffers were made for. Weights are read in the checkpoint's own layout and format.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Weight formats (nemoh/kernels/cpu_library.py: FORMAT_*).
enum {
    NEMOH_F32 = 0,
    NEMOH_BF16 = 1,
    NEMOH_F16 = 2,
    NEMOH_FP8 = 3,     // float8_e4m3fn (n, k) with one float32 scale per tensor
    NEMOH_NVFP4 = 4,   // uint8 (n, k/2) E2M1 pairs (element 2i in the low nibble), e4m3 scale (n, k/16), fp32 scale
};
// A format | NEMOH_PANELS: the same values re-laid in panels of 16 output features, input-major
// (nemoh_pack_panels): element (n, k) at [n / 16][k][n % 16]; NVFP4 codes (n / 16, k, 8 bytes: feature 2i in the
// low nibble of byte i) with its scales (n / 16, k / 16, 16). Features past n in the last panel are zero.
#define NEMOH_PANELS 0x100
#define NEMOH_PANEL 16

// Linear epilogues: what happens to each accumulated output value.
enum {
    NEMOH_STORE = 0,   // y = acc
    NEMOH_RELU2 = 1,   // y = relu(acc)^2
    NEMOH_ADD = 2,     // y = y + acc
};

#define NEMOH_PER_SEQUENCE (-1)   // `rows` of a kernel that runs on one row per sequence of the step

typedef struct {
    int64_t num_rows;  // token rows in this step
    int64_t num_seqs;  // sequences in this step
} StepShape;

typedef struct {
    int32_t format;
    int32_t _pad;
    int64_t n, k;            // out_features, in_features
    const void* data;        // row-major (n, k) elements; NVFP4: (n, k/2) bytes
    const uint8_t* block_scale;  // NVFP4: e4m3 (n, k/16)
    float scale;             // FP8: weight_scale; NVFP4: weight_scale_2; else 1
    int32_t _pad2;
    const float* bias;       // float32 (n,) or NULL
    // A panel-layout weight may also keep its plain layout here (else NULL): a one-row NVFP4 product reads
    // the plain rows faster (a dot product per row, block scales on partial sums).
    const void* plain_data;
    const uint8_t* plain_block_scale;
} Weight;

// y[m, :] = epilogue(x[m, :] @ W^T + bias) for m < rows. Rows: *rows_ptr when set (a step's row count), else
// `rows`. round_bf16: round every stored value to bfloat16 precision (a bfloat16 model's activations).
typedef struct {
    const StepShape* shape;
    int64_t rows;
    const float* x;
    int64_t x_stride;
    float* y;
    int64_t y_stride;
    Weight w;
    int32_t epilogue;
    int32_t round;        // NEMOH_ROUND_*
} LinearArgs;

// Rounding of stored activations (`round` fields): what a model of that dtype stores between operations.
enum {
    NEMOH_ROUND_NONE = 0,   // float32 model
    NEMOH_ROUND_BF16 = 1,
    NEMOH_ROUND_F16 = 2,
};

// Row counts: `rows` when `shape` is NULL, else shape->num_rows (a step's rows, set before each replay), or
// shape->num_seqs when `rows` is NEMOH_PER_SEQUENCE.

// x[r, :] = table[ids[r], :] for r < rows.
typedef struct {
    const StepShape* shape;
    int64_t rows;
    const int64_t* ids;
    const void* table;
    int32_t table_format;
    int32_t _pad;
    int64_t hidden;
    float* x;
    int64_t x_stride;
} EmbedArgs;

// y[r] = rms_norm(x[r]) * w, in float32, stored with `round`.
typedef struct {
    const StepShape* shape;
    int64_t rows;
    const float* x;
    int64_t x_stride;
    float* y;
    int64_t y_stride;
    const float* weight;
    int64_t hidden;
    float eps;
    int32_t round;
} RMSNormArgs;

// x[r] = round(x[r] + a[r]).
typedef struct {
    const StepShape* shape;
    int64_t rows;
    float* x;
    int64_t x_stride;
    const float* a;
    int64_t a_stride;
    int64_t width;
    int32_t round;
    int32_t _pad;
} AddArgs;

// y[i] = x[idx[i]] for i < count (count: shape->num_seqs when shape is set, else `count`).
typedef struct {
    const StepShape* shape;
    int64_t count;
    const int64_t* idx;
    const float* x;
    int64_t x_stride;
    float* y;
    int64_t y_stride;
    int64_t width;
} GatherRowsArgs;

// out[r] = argmax_v logits[r, v] (the first maximum), for r < rows.
typedef struct {
    const StepShape* shape;
    int64_t rows;
    const float* logits;
    int64_t stride;
    int64_t vocab;
    int64_t* out;
} ArgmaxArgs;

// LatentMoE routing (REFERENCE §1): scores = sigmoid(logits); choice = scores + bias, group-limited top-k;
// weights = scores of the chosen experts, normalised when norm_topk, times scaling.
typedef struct {
    const StepShape* shape;
    int64_t rows;
    const float* logits;
    int64_t logits_stride;
    const float* bias;
    int64_t num_experts;
    int64_t top_k;
    int64_t n_group;
    int64_t topk_group;
    int32_t norm_topk;
    float scaling;
    int32_t* ids;          // (rows, top_k)
    float* weights;        // (rows, top_k)
} RouteArgs;

// Routed experts: out[r] = round(sum_j weights[r, j] * down_e(relu2(up_e(u[r])))) with e = ids[r, j], every
// product stored with `round` as the reference's expert modules store them.
typedef struct {
    const StepShape* shape;
    int64_t rows;
    const float* u;
    int64_t u_stride;
    const int32_t* ids;
    const float* weights;
    int64_t top_k;
    const Weight* up;       // num_experts descriptors (intermediate, latent)
    const Weight* down;     // num_experts descriptors (latent, intermediate)
    int64_t num_experts;
    float* out;
    int64_t out_stride;
    int32_t round;
    int32_t _pad;
} ExpertsArgs;

// The Mamba-2 mixer between in_proj and out_proj (REFERENCE §1 steps 2-5) for seqs of `q` consecutive rows
// each (rows = num_seqs * q), continuing from each sequence's cached state: conv, SiLU, dt, the SSD recurrence,
// D skip, gated group RMSNorm. The slots' conv and SSM states are advanced in place; with `saved_ssm` set, the
// state after every row is also written there, (num_seqs, q, ...) in the caches' dtypes, for a roll-back.
typedef struct {
    const StepShape* shape;
    int64_t q;
    const float* proj;          // (rows, d_inner + conv_dim + num_heads): z | xBC | dt
    int64_t proj_stride;
    const int64_t* slots;       // (num_seqs,)
    void* conv_cache;           // (slots, conv_dim, kernel - 1)
    int32_t conv_format;
    int32_t ssm_format;
    void* ssm_cache;            // (slots, num_heads, head_dim, state)
    const float* conv_weight;   // (conv_dim, kernel)
    const float* conv_bias;     // (conv_dim,) or NULL
    const float* dt_bias;       // (num_heads,)
    const float* A;             // (num_heads,) = -exp(A_log)
    const float* D;             // (num_heads,)
    const float* norm_weight;   // (d_inner,)
    int64_t num_heads, head_dim, n_groups, state_size, conv_kernel;
    float dt_min, dt_max, eps;
    int32_t round;
    float* xbc;                 // scratch (rows, conv_dim)
    float* y;                   // (rows, d_inner) output
    int64_t y_stride;
    void* saved_conv;           // NULL or (num_seqs, q, conv_dim, kernel - 1)
    void* saved_ssm;            // NULL or (num_seqs, q, num_heads, head_dim, state)
} MambaArgs;

// Causal GQA over the paged KV cache for seqs of `q` consecutive rows each: the rows' keys and values are
// written at slot_mapping first, then row r (of sequence r / q) attends the keys at positions 0..positions[r].
typedef struct {
    const StepShape* shape;
    int64_t q;
    const float* qkv;           // (rows, (num_heads + 2 * num_kv_heads) * head_dim)
    int64_t qkv_stride;
    const int64_t* positions;   // (rows,)
    const int64_t* slot_mapping;  // (rows,) flat KV slot of each row's key / value
    const int32_t* block_tables;  // (num_seqs, max_blocks)
    int64_t max_blocks;
    void* k_cache;              // (num_blocks, block_size, num_kv_heads, head_dim)
    void* v_cache;
    int32_t cache_format;
    float k_scale, v_scale;     // fp8 cache: stored = value / scale
    int64_t block_size, num_heads, num_kv_heads, head_dim;
    float sm_scale;
    int32_t round;
    float* out;                 // (rows, num_heads * head_dim)
    int64_t out_stride;
} AttentionArgs;

typedef void (*nemoh_kernel)(const void* args);

typedef struct {
    nemoh_kernel fn;
    const void* args;
} PlanEntry;

void nemoh_linear(const void* args);
// Bytes of the panel layout of `w` (a plain layout): its values, and (NVFP4) its block scales.
int64_t nemoh_panel_bytes(const Weight* w, int64_t* scale_bytes);
// Writes `w` (a plain layout) in the panel layout into data (and scales for NVFP4).
void nemoh_pack_panels(const Weight* w, void* data, void* scales);
void nemoh_embed(const void* args);
void nemoh_rmsnorm(const void* args);
void nemoh_add(const void* args);
void nemoh_gather_rows(const void* args);
void nemoh_argmax(const void* args);
void nemoh_route(const void* args);
void nemoh_experts(const void* args);
void nemoh_mamba(const void* args);
void nemoh_attention(const void* args);
void nemoh_run_plan(const PlanEntry* entries, int64_t n);
// The same, adding each entry's wall time in nanoseconds to ns[i] (a profile of a plan).
void nemoh_run_plan_timed(const PlanEntry* entries, int64_t n, int64_t* ns);
void nemoh_set_num_threads(int32_t n);
int32_t nemoh_get_num_threads(void);
int32_t nemoh_abi_version(void);
// sizeof of every struct above, in the order of cpu_library.STRUCTS; returns how many there are.
int64_t nemoh_struct_sizes(int64_t* out, int64_t n);

#ifdef __cplusplus
}
#endif
