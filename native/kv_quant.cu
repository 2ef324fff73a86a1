// KIVI-style KV quantization kernels; compiled at run time by afkv/ops/native.py (CuPy NVRTC).
//
// The format and the arithmetic are those of afkv/ops/quant.py (read its docstring first):
// asymmetric min/max groups, float32 scale and zero, rint (half to even), int4 packed two
// channels a byte along head_dim (element 2j in the low nibble). Every float operation uses an
// explicit _rn intrinsic, so neither FMA contraction nor fast-math options change the result:
// the kernels write the same bytes as the torch reference.
//
// No headers: 16-bit floats are carried as unsigned short and converted with PTX (float16) or
// bit operations (bfloat16), so NVRTC needs no include path.
//
// Tensors are seen as rows: the float side (input of quantize, output of dequantize) is
// [num_outer, row] with `row` contiguous and `outer_stride` elements between rows (so a slice
// kv[b, :, 0] of the cache needs no copy); the quantized side is C-contiguous.
//   keys:   float [num_outer, num_tokens, channels]  (channels = H * D)
//           data  [num_outer, num_tokens, channels * BITS / 8]
//           scale, zero [num_outer, num_tokens / group_size, channels]
//   values: float [num_outer, num_rows, head_dim]     (num_rows = T * H)
//           data  [num_outer, num_rows, head_dim * BITS / 8]
//           scale, zero [num_outer, num_rows, head_dim / group_size]
// Kernel names: afkv_{quantize,dequantize}_{keys,values}_{f32,f16,bf16}_b{8,4}; one thread per
// output byte (dequantize), per (key group, byte column) or per value group (quantize).

typedef unsigned char u8;
typedef unsigned short u16;
typedef long long i64;

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float f) { return f; }
};

struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
    }
    static __device__ __forceinline__ u16 store(float f) {
        u16 v;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
        return v;
    }
};

struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 v) { return __uint_as_float(((unsigned)v) << 16); }
    static __device__ __forceinline__ u16 store(float f) {  // round to nearest even, like torch
        unsigned u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0u;  // NaN, as torch writes it
        u += 0x7fffu + ((u >> 16) & 1u);
        return (u16)(u >> 16);
    }
};

template <int BITS>
struct Codes {
    static constexpr int per_byte = 8 / BITS;
    static constexpr int qmax = (1 << BITS) - 1;
    static __device__ __forceinline__ float scale(float lo, float hi) {
        return __fdiv_rn(__fsub_rn(hi, lo), (float)qmax);
    }
    static __device__ __forceinline__ unsigned code(float x, float zero, float scale) {
        float s = scale > 0.0f ? scale : 1.0f;
        float q = rintf(__fdiv_rn(__fsub_rn(x, zero), s));
        return (unsigned)fminf(fmaxf(q, 0.0f), (float)qmax);
    }
    static __device__ __forceinline__ float value(unsigned code, float zero, float scale) {
        return __fadd_rn(__fmul_rn((float)code, scale), zero);
    }
};

__device__ __forceinline__ i64 thread_index() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }

// One thread: one key group (group_size tokens) of per_byte adjacent channels.
template <typename DT, int BITS>
__device__ __forceinline__ void quantize_keys(const typename DT::T* __restrict__ x, i64 outer_stride,
                                              u8* __restrict__ data, float* __restrict__ scale,
                                              float* __restrict__ zero, i64 num_outer, int num_tokens,
                                              int channels, int group_size) {
    typedef Codes<BITS> C;
    const int row_bytes = channels / C::per_byte;
    const int num_groups = num_tokens / group_size;
    const i64 i = thread_index();
    if (i >= num_outer * num_groups * row_bytes) return;
    const int col = (int)(i % row_bytes);
    const i64 og = i / row_bytes;  // outer * num_groups + group
    const int group = (int)(og % num_groups);
    const i64 outer = og / num_groups;
    const int c0 = col * C::per_byte;
    const typename DT::T* xg = x + outer * outer_stride + (i64)group * group_size * channels + c0;

    float lo[C::per_byte], hi[C::per_byte], s[C::per_byte];
#pragma unroll
    for (int p = 0; p < C::per_byte; ++p) lo[p] = hi[p] = DT::load(xg[p]);
    for (int t = 1; t < group_size; ++t) {
#pragma unroll
        for (int p = 0; p < C::per_byte; ++p) {
            const float v = DT::load(xg[(i64)t * channels + p]);
            lo[p] = fminf(lo[p], v);
            hi[p] = fmaxf(hi[p], v);
        }
    }
#pragma unroll
    for (int p = 0; p < C::per_byte; ++p) {
        s[p] = C::scale(lo[p], hi[p]);
        scale[og * channels + c0 + p] = s[p];
        zero[og * channels + c0 + p] = lo[p];
    }
    u8* dg = data + (outer * num_tokens + (i64)group * group_size) * row_bytes + col;
    for (int t = 0; t < group_size; ++t) {
        unsigned byte = 0;
#pragma unroll
        for (int p = 0; p < C::per_byte; ++p)
            byte |= C::code(DT::load(xg[(i64)t * channels + p]), lo[p], s[p]) << (p * BITS);
        dg[(i64)t * row_bytes] = (u8)byte;
    }
}

// One thread: one value group (group_size adjacent channels of one token and head).
template <typename DT, int BITS>
__device__ __forceinline__ void quantize_values(const typename DT::T* __restrict__ x, i64 outer_stride,
                                                u8* __restrict__ data, float* __restrict__ scale,
                                                float* __restrict__ zero, i64 num_outer, i64 num_rows,
                                                int head_dim, int group_size) {
    typedef Codes<BITS> C;
    const int num_groups = head_dim / group_size;
    const i64 i = thread_index();
    if (i >= num_outer * num_rows * num_groups) return;
    const int group = (int)(i % num_groups);
    const i64 rr = i / num_groups;  // outer * num_rows + row
    const i64 row = rr % num_rows;
    const i64 outer = rr / num_rows;
    const typename DT::T* xg = x + outer * outer_stride + row * head_dim + (i64)group * group_size;

    float lo = DT::load(xg[0]), hi = lo;
    for (int j = 1; j < group_size; ++j) {
        const float v = DT::load(xg[j]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    const float s = C::scale(lo, hi);
    scale[i] = s;
    zero[i] = lo;
    u8* dg = data + rr * (head_dim / C::per_byte) + group * group_size / C::per_byte;
    for (int j = 0; j < group_size; j += C::per_byte) {
        unsigned byte = 0;
#pragma unroll
        for (int p = 0; p < C::per_byte; ++p) byte |= C::code(DT::load(xg[j + p]), lo, s) << (p * BITS);
        dg[j / C::per_byte] = (u8)byte;
    }
}

// One thread: one data byte -> per_byte keys.
template <typename DT, int BITS>
__device__ __forceinline__ void dequantize_keys(const u8* __restrict__ data, const float* __restrict__ scale,
                                                const float* __restrict__ zero, typename DT::T* __restrict__ out,
                                                i64 outer_stride, i64 num_outer, int num_tokens, int channels,
                                                int group_size) {
    typedef Codes<BITS> C;
    const int row_bytes = channels / C::per_byte;
    const i64 i = thread_index();
    if (i >= num_outer * num_tokens * row_bytes) return;
    const int col = (int)(i % row_bytes);
    const i64 ot = i / row_bytes;  // outer * num_tokens + token
    const int token = (int)(ot % num_tokens);
    const i64 outer = ot / num_tokens;
    const int c0 = col * C::per_byte;
    const i64 g = (outer * (num_tokens / group_size) + token / group_size) * channels + c0;
    const unsigned byte = data[i];
    typename DT::T* o = out + outer * outer_stride + (i64)token * channels + c0;
#pragma unroll
    for (int p = 0; p < C::per_byte; ++p)
        o[p] = DT::store(C::value((byte >> (p * BITS)) & C::qmax, zero[g + p], scale[g + p]));
}

// One thread: one data byte -> per_byte values (one group: group_size is even for int4).
template <typename DT, int BITS>
__device__ __forceinline__ void dequantize_values(const u8* __restrict__ data, const float* __restrict__ scale,
                                                  const float* __restrict__ zero, typename DT::T* __restrict__ out,
                                                  i64 outer_stride, i64 num_outer, i64 num_rows, int head_dim,
                                                  int group_size) {
    typedef Codes<BITS> C;
    const int row_bytes = head_dim / C::per_byte;
    const i64 i = thread_index();
    if (i >= num_outer * num_rows * row_bytes) return;
    const int col = (int)(i % row_bytes);
    const i64 rr = i / row_bytes;  // outer * num_rows + row
    const i64 row = rr % num_rows;
    const i64 outer = rr / num_rows;
    const int d0 = col * C::per_byte;
    const i64 g = rr * (head_dim / group_size) + d0 / group_size;
    const float s = scale[g], z = zero[g];
    const unsigned byte = data[i];
    typename DT::T* o = out + outer * outer_stride + row * head_dim + d0;
#pragma unroll
    for (int p = 0; p < C::per_byte; ++p) o[p] = DT::store(C::value((byte >> (p * BITS)) & C::qmax, z, s));
}

#define AFKV_KV_QUANT_KERNELS(NAME, DT, BITS)                                                                     \
    extern "C" __global__ void afkv_quantize_keys_##NAME##_b##BITS(                                               \
        const DT::T* x, i64 outer_stride, u8* data, float* scale, float* zero, i64 num_outer, int num_tokens,     \
        int channels, int group_size) {                                                                           \
        quantize_keys<DT, BITS>(x, outer_stride, data, scale, zero, num_outer, num_tokens, channels, group_size); \
    }                                                                                                             \
    extern "C" __global__ void afkv_quantize_values_##NAME##_b##BITS(                                             \
        const DT::T* x, i64 outer_stride, u8* data, float* scale, float* zero, i64 num_outer, i64 num_rows,       \
        int head_dim, int group_size) {                                                                           \
        quantize_values<DT, BITS>(x, outer_stride, data, scale, zero, num_outer, num_rows, head_dim, group_size); \
    }                                                                                                             \
    extern "C" __global__ void afkv_dequantize_keys_##NAME##_b##BITS(                                             \
        const u8* data, const float* scale, const float* zero, DT::T* out, i64 outer_stride, i64 num_outer,       \
        int num_tokens, int channels, int group_size) {                                                           \
        dequantize_keys<DT, BITS>(data, scale, zero, out, outer_stride, num_outer, num_tokens, channels,          \
                                  group_size);                                                                    \
    }                                                                                                             \
    extern "C" __global__ void afkv_dequantize_values_##NAME##_b##BITS(                                           \
        const u8* data, const float* scale, const float* zero, DT::T* out, i64 outer_stride, i64 num_outer,       \
        i64 num_rows, int head_dim, int group_size) {                                                             \
        dequantize_values<DT, BITS>(data, scale, zero, out, outer_stride, num_outer, num_rows, head_dim,          \
                                    group_size);                                                                  \
    }

AFKV_KV_QUANT_KERNELS(f32, F32, 8)
AFKV_KV_QUANT_KERNELS(f32, F32, 4)
AFKV_KV_QUANT_KERNELS(f16, F16, 8)
AFKV_KV_QUANT_KERNELS(f16, F16, 4)
AFKV_KV_QUANT_KERNELS(bf16, BF16, 8)
AFKV_KV_QUANT_KERNELS(bf16, BF16, 4)

// ---------------------------------------------------------------------------------------------
// Decode attention over quantized paged blocks (reference: afkv.ops.quant.paged_decode_attention).
//
// cache [num_blocks, block_nbytes]: serialised blocks (format in afkv/ops/quant.py); the off_*
// arguments are the byte offsets of this layer's part of each section inside a block. One CTA
// per (sequence, query head); warp w takes the sequence's blocks w, w + kAttnWarps, ..., reads
// each token's key and value row, dequantizing as it reads, and keeps an online softmax; the
// warps merge at the end. Lane l holds channels l, l + 32, ..., l + 32 * (DPL - 1); DPL (dims
// per lane) is the smallest instantiated one with 32 * DPL >= head_dim.

constexpr int kAttnWarps = 4;

template <typename DT, int BITS, int DPL>
__device__ __forceinline__ void decode_attention(
    const typename DT::T* __restrict__ q, const u8* __restrict__ cache, const int* __restrict__ block_tables,
    int max_blocks, const int* __restrict__ seq_lens, typename DT::T* __restrict__ out, i64 block_nbytes,
    i64 off_k_scale, i64 off_k_zero, i64 off_v_scale, i64 off_v_zero, i64 off_k_data, i64 off_v_data,
    int num_q_heads, int num_kv_heads, int head_dim, int block_size, int group_size, float softmax_scale) {
    typedef Codes<BITS> C;
    __shared__ float s_max[kAttnWarps], s_sum[kAttnWarps];
    __shared__ float s_acc[kAttnWarps][32 * DPL];

    const int seq = blockIdx.x / num_q_heads;
    const int q_head = blockIdx.x % num_q_heads;
    const int kv_head = q_head / (num_q_heads / num_kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int seq_len = seq_lens[seq];
    const int row_bytes = head_dim / C::per_byte;
    const int v_groups = head_dim / group_size;
    // strides between consecutive tokens inside a block, per section
    const i64 data_stride = (i64)num_kv_heads * row_bytes;
    const i64 k_group_stride = (i64)num_kv_heads * head_dim;  // floats, per group of group_size tokens
    const i64 v_group_stride = (i64)num_kv_heads * v_groups;  // floats, per token
    const typename DT::T* q_row = q + ((i64)seq * num_q_heads + q_head) * head_dim;

    float qv[DPL], acc[DPL];
    int v_group[DPL];
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
        const int d = lane + 32 * j;
        qv[j] = d < head_dim ? DT::load(q_row[d]) * softmax_scale : 0.0f;
        v_group[j] = d / group_size;
        acc[j] = 0.0f;
    }
    const float neg_inf = __int_as_float(0xff800000);
    float run_max = neg_inf, run_sum = 0.0f;
    const int num_blocks = (seq_len + block_size - 1) / block_size;
    for (int b = warp; b < num_blocks; b += kAttnWarps) {
        const u8* blk = cache + (i64)block_tables[(i64)seq * max_blocks + b] * block_nbytes;
        const int num_tokens = min(block_size, seq_len - b * block_size);
        const float* ks = reinterpret_cast<const float*>(blk + off_k_scale) + (i64)kv_head * head_dim;
        const float* kz = reinterpret_cast<const float*>(blk + off_k_zero) + (i64)kv_head * head_dim;
        const float* vs = reinterpret_cast<const float*>(blk + off_v_scale) + (i64)kv_head * v_groups;
        const float* vz = reinterpret_cast<const float*>(blk + off_v_zero) + (i64)kv_head * v_groups;
        const u8* kd = blk + off_k_data + (i64)kv_head * row_bytes;
        const u8* vd = blk + off_v_data + (i64)kv_head * row_bytes;
        float k_scale[DPL], k_zero[DPL];
        for (int tb = 0, group_left = 0; tb < num_tokens; ++tb, --group_left) {
            if (group_left == 0) {  // a new key group: its per-channel scale and zero
                group_left = group_size;
#pragma unroll
                for (int j = 0; j < DPL; ++j) {
                    const int d = lane + 32 * j;
                    k_scale[j] = d < head_dim ? ks[d] : 0.0f;
                    k_zero[j] = d < head_dim ? kz[d] : 0.0f;
                }
                ks += k_group_stride;
                kz += k_group_stride;
            }
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < DPL; ++j) {
                const int d = lane + 32 * j;
                if (d < head_dim) {
                    const unsigned code = (kd[d / C::per_byte] >> ((d % C::per_byte) * BITS)) & C::qmax;
                    dot += qv[j] * C::value(code, k_zero[j], k_scale[j]);
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            const float new_max = fmaxf(run_max, dot);
            const float correction = __expf(run_max - new_max);  // 0 for the first token
            const float p = __expf(dot - new_max);
            run_sum = run_sum * correction + p;
            run_max = new_max;
#pragma unroll
            for (int j = 0; j < DPL; ++j) {
                const int d = lane + 32 * j;
                if (d < head_dim) {
                    const unsigned code = (vd[d / C::per_byte] >> ((d % C::per_byte) * BITS)) & C::qmax;
                    acc[j] = acc[j] * correction + p * C::value(code, vz[v_group[j]], vs[v_group[j]]);
                }
            }
            kd += data_stride;
            vd += data_stride;
            vs += v_group_stride;
            vz += v_group_stride;
        }
    }
    if (lane == 0) {
        s_max[warp] = run_max;
        s_sum[warp] = run_sum;
    }
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) s_acc[warp][d] = acc[j];
    }
    __syncthreads();

    float max_all = neg_inf;
    for (int w = 0; w < kAttnWarps; ++w)
        if (s_sum[w] > 0.0f) max_all = fmaxf(max_all, s_max[w]);
    float weight[kAttnWarps], denom = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) {
        weight[w] = s_sum[w] > 0.0f ? __expf(s_max[w] - max_all) : 0.0f;  // warps without tokens add nothing
        denom += s_sum[w] * weight[w];
    }
    typename DT::T* o_row = out + ((i64)seq * num_q_heads + q_head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < kAttnWarps; ++w) o += s_acc[w][d] * weight[w];
        o_row[d] = DT::store(denom > 0.0f ? o / denom : 0.0f);  // an empty sequence gets zeros
    }
}

#define AFKV_DECODE_ATTENTION_KERNEL(NAME, DT, BITS, DPL)                                                         \
    extern "C" __global__ void __launch_bounds__(kAttnWarps * 32)                                                 \
        afkv_decode_attention_##NAME##_b##BITS##_d##DPL(                                                         \
            const DT::T* q, const u8* cache, const int* block_tables, int max_blocks, const int* seq_lens,        \
            DT::T* out, i64 block_nbytes, i64 off_k_scale, i64 off_k_zero, i64 off_v_scale, i64 off_v_zero,       \
            i64 off_k_data, i64 off_v_data, int num_q_heads, int num_kv_heads, int head_dim, int block_size,      \
            int group_size, float softmax_scale) {                                                                \
        decode_attention<DT, BITS, DPL>(q, cache, block_tables, max_blocks, seq_lens, out, block_nbytes,          \
                                        off_k_scale, off_k_zero, off_v_scale, off_v_zero, off_k_data, off_v_data, \
                                        num_q_heads, num_kv_heads, head_dim, block_size, group_size,              \
                                        softmax_scale);                                                           \
    }
#define AFKV_DECODE_ATTENTION_KERNELS(DPL)                \
    AFKV_DECODE_ATTENTION_KERNEL(f32, F32, 8, DPL)        \
    AFKV_DECODE_ATTENTION_KERNEL(f32, F32, 4, DPL)        \
    AFKV_DECODE_ATTENTION_KERNEL(f16, F16, 8, DPL)        \
    AFKV_DECODE_ATTENTION_KERNEL(f16, F16, 4, DPL)        \
    AFKV_DECODE_ATTENTION_KERNEL(bf16, BF16, 8, DPL)      \
    AFKV_DECODE_ATTENTION_KERNEL(bf16, BF16, 4, DPL)

AFKV_DECODE_ATTENTION_KERNELS(2)   // head_dim <= 64
AFKV_DECODE_ATTENTION_KERNELS(4)   // head_dim <= 128
AFKV_DECODE_ATTENTION_KERNELS(8)   // head_dim <= 256
AFKV_DECODE_ATTENTION_KERNELS(16)  // head_dim <= 512
