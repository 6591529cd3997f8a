/* Shared pieces of the CUDA backend: core headers (C), error checks, the
 * device-side dequantizers. */
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

extern "C" {
#include "backend.h"
#include "quants.h"
#include "session_state.h"
#include "weights.h"
}

#define WARP 32

/* Warp reductions: every lane gets the result. */
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Programmatic dependent launch (sm_90+): every kernel is launched with
 * permission to start while its predecessor in the stream finishes, and
 * begins by waiting for that predecessor's completion (and memory), then
 * lets its own successor launch. So a successor's launch, block scheduling
 * and prologue overlap this kernel's work instead of following it: the
 * ~1,500 launches of a decode step are each a few microseconds of work.
 * Only one-token steps launch so (measured on an H200: decode 74.0 -> 80.6
 * tok/s at 2K, but prefill chunks 1,509 -> 1,429). Before sm_90, and with
 * DS4_CUDA_NO_PDL=1, launches are plain. Since every kernel waits before
 * it reads what another kernel writes, a launch is correct either way:
 * g_pdl only picks the faster. (Some kernels read their weights before the
 * wait: no kernel writes those, and their loads then overlap the
 * predecessor; lin_args.early.) */
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* The 128-byte line holding p on its way into L2 (a hint: no registers,
 * nothing to wait for). */
__device__ __forceinline__ void prefetch_l2(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

/* 16 bytes global -> shared, asynchronous (cp.async, L2 only): complete
 * after cp.async.wait_group / wait_all. dst a shared-window address (its
 * arithmetic done once by a caller, not a conversion a copy). */
__device__ __forceinline__ void cp_async16_to(uint32_t dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    cp_async16_to((uint32_t)__cvta_generic_to_shared(dst), src);
}

/* Four 8 x 16-byte matrices (ldmatrix .b16) from the shared-window address
 * lane l gives for row l % 8 of matrix l / 8: register k of a lane holds
 * bytes 4 (l % 4) .. + 3 of row l / 4 of matrix k. */
__device__ __forceinline__ void ldsm_x4_at(uint32_t *r, uint32_t at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
}

/* 8 or 4 bytes (through L1: .cg takes 16 only), for rows aligned to them */
__device__ __forceinline__ void cp_async8(void *dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"((uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src));
}

__device__ __forceinline__ void cp_async4(void *dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src));
}

static bool g_pdl_device = false;   /* sm_90+, not switched off (model_init) */
static bool g_pdl = false;          /* this forward's launches (forward) */

/* DS4_CUDA_CARVEOUT=percent (read at load; -1: unset): every kernel's
 * preferred L1 / shared-memory split, set at its first launch. An SM runs
 * blocks of one split at a time, so a kernel whose shared memory needs another
 * split than its predecessor's waits for that SM to drain: this asks whether
 * the decode chain pays for that between its kernels of small and large
 * shared memory. */
static int g_carveout = -1;

template <typename K>
static void carveout_once(K kernel) {
    static const void *seen[512];   /* kernels given the split; launches are not concurrent */
    static int n_seen = 0;
    for (int i = 0; i < n_seen; i++)
        if (seen[i] == (const void *)kernel) return;
    if (n_seen < 512) seen[n_seen++] = (const void *)kernel;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, g_carveout) != cudaSuccess)
        (void)cudaGetLastError();
}

template <typename... KArgs, typename... Args>
static void launch_k(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t shm, cudaStream_t st, Args... args) {
    if (g_carveout >= 0) carveout_once(kernel);
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = shm;
    cfg.stream = st;
    cfg.attrs = &attr;
    cfg.numAttrs = g_pdl ? 1 : 0;
    cudaLaunchKernelEx(&cfg, kernel, args...);
}

/* Blocks of `kernel` at `threads` and `shm` bytes that the GPU holds at once
 * (the grids of one-token kernels whose blocks stride over their work). */
static int gpu_sms(void) {
    int dev = 0, sms = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    return sms;
}

template <typename K>
static int gpu_fill(K kernel, int threads, size_t shm) {
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shm);
    return gpu_sms() * (per_sm > 0 ? per_sm : 1);
}

/* Shared memory a block may have on this GPU (its opt-in maximum: 227 KB
 * on sm_90, 163 KB on sm_80, 99 KB on sm_86 / sm_89), set at load;
 * DS4_CUDA_SHARED_LIMIT=bytes lowers it, so that an H200 runs the kernels a
 * smaller GPU would (the tests'). */
static size_t g_shared_limit = 48 * 1024;

/* Lets kernel take `bytes` of dynamic shared memory (the opt-in above 48
 * KB), if that and its static shared memory fit in g_shared_limit. False
 * where they do not: the caller keeps a kernel of less shared memory, or
 * names what the GPU lacks. A refusal leaves no error behind for the next
 * cudaGetLastError. */
template <typename K>
static bool allow_shared(K kernel, size_t bytes) {
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    if (bytes + fa.sharedSizeBytes > g_shared_limit) return false;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return true;
}

/* A matrix on the device: rows of n_in elements of `type`. */
struct dmat {
    const uint8_t *data;
    int type;
    int n_in, n_out;
    int64_t row_bytes;
};

/* Device weight formats: the file's type, | DEV_NARROW where a repacked row
 * (below) is too short for its code words to be 8-byte aligned (small test
 * models), so kernels load them 2 bytes at a time. A flag in the type, not a
 * test in the loop, so that each kernel's loads compile branch-free. */
#define DEV_NARROW 0x100
__host__ __device__ constexpr int base_type(int type) { return type & 0xff; }

/* Formats whose rows the CUDA backend repacks at load (dev_repack), and the
 * n_in multiple that keeps their code words 8-byte aligned. */
static inline int repack_wide_multiple(int type) {
    return type == DS4_TYPE_Q8_0 ? 128 : type == DS4_TYPE_Q2_K ? 512 : type == DS4_TYPE_IQ2_XXS ? 1024 : 0;
}

static inline dmat dmat_of(const ds4_tensor &t) {
    int wide = repack_wide_multiple(t.type);
    int narrow = wide && t.ne[0] % wide ? DEV_NARROW : 0;
    dmat m = {(const uint8_t *)t.data, t.type | narrow, (int)t.ne[0],
              (int)(t.n_dims > 1 ? t.ne[1] : 1), t.row_bytes};
    return m;
}

/* ---- device dequantization: 8 consecutive elements at e0 of a row ----
 * e0 is a multiple of 8, so the 8 never straddle a block of any type. Float
 * rows (n_in % 8 == 0, check_shapes) take 16-byte loads. Q8_0, Q2_K and
 * IQ2_XXS rows are repacked at load (dev_repack), each row's blocks split
 * into arrays of like fields, so that a warp's code loads are contiguous
 * 8-byte words instead of 2-byte pieces of 34, 84 and 66-byte blocks:
 *   Q8_0     nb fp16 scales | nb x 32 codes               (nb = n_in / 32)
 *   Q2_K     nb (d, dmin) fp16 pairs | nb x 16 scales | nb x 64 code bytes
 *   IQ2_XXS  nb fp16 scales | nb x 64 code bytes           (nb = n_in / 256)
 * Q4_K rows stay as in the file (144-byte blocks: 2-byte loads). */

/* The fp16 in the low 16 bits of `bits` as a float. */
__device__ __forceinline__ float h2f_bits(uint32_t bits) {
    return __half2float(__ushort_as_half((uint16_t)bits));
}

__device__ __forceinline__ float d_h2f(const uint8_t *p) { return h2f_bits(*(const uint16_t *)p); }

__device__ __forceinline__ uint32_t d_u32(const uint8_t *p) {
    const uint16_t *q = (const uint16_t *)p;
    return (uint32_t)q[0] | ((uint32_t)q[1] << 16);
}

/* Eight code bytes at q as two words: one 8-byte load, or 2-byte loads for
 * a DEV_NARROW row. */
template <bool NARROW>
__device__ __forceinline__ void load8(const uint8_t *q, uint32_t &lo, uint32_t &hi) {
    if (NARROW) {
        lo = d_u32(q), hi = d_u32(q + 4);
    } else {
        uint2 v = *(const uint2 *)q;
        lo = v.x, hi = v.y;
    }
}

/* Byte j of v as the signed integer it codes, exactly: 2^23 + (b ^ 0x80)
 * built as float bits, less 2^23 + 128 (a byte permute and a float add, not
 * the quarter-rate integer conversion). */
__device__ __forceinline__ float s8_at(uint32_t v, int j) {
    return __uint_as_float(__byte_perm(v ^ 0x80808080u, 0x4Bu, 0x4550 + j)) - 8388736.0f;
}

/* The same for an unsigned code below 2^23 (2^23 + c as float bits, less 2^23). */
__device__ __forceinline__ float u_code(uint32_t c) { return __uint_as_float(0x4B000000u | c) - 8388608.0f; }

/* IQ2_XXS tables, filled from iq2_tables.h at model init (one translation unit) */
__device__ uint64_t d_iq2_grid[256];
__device__ uint8_t d_iq2_signs[128];

__device__ __forceinline__ void deq8(int type, const uint8_t *row, int n_in, int e0, float *w) {
    const bool narrow = type & DEV_NARROW;
    switch (base_type(type)) {
    case DS4_TYPE_F32: {   /* rows of n_in % 8 == 0 floats: 32-byte aligned */
        float4 a = *(const float4 *)((const float *)row + e0), b = *(const float4 *)((const float *)row + e0 + 4);
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
        break;
    }
    case DS4_TYPE_F16: {   /* rows of n_in % 8 == 0 halves: 16-byte aligned */
        uint4 v = *(const uint4 *)((const uint16_t *)row + e0);
        const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __half22float2(*(const __half2 *)&u[j]);
            w[2 * j] = f.x;
            w[2 * j + 1] = f.y;
        }
        break;
    }
    case DS4_TYPE_BF16: {
        uint4 v = *(const uint4 *)((const uint16_t *)row + e0);
        const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            w[2 * j] = __uint_as_float(u[j] << 16);
            w[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
        }
        break;
    }
    case DS4_TYPE_Q8_0: {
        float d = d_h2f(row + 2 * (e0 / 32));
        uint32_t lo, hi;
        const uint8_t *q = row + 2 * (n_in / 32) + e0;
        if (narrow) load8<true>(q, lo, hi);
        else load8<false>(q, lo, hi);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            w[j] = s8_at(lo, j) * d;
            w[4 + j] = s8_at(hi, j) * d;
        }
        break;
    }
    case DS4_TYPE_Q2_K: {
        int nb = n_in / 256, b = e0 / 256;
        int j = e0 % 256, n = j / 128, s = (j % 128) / 32, h = (j % 32) / 16, l0 = j % 16;
        float d = d_h2f(row + 4 * b), dmin = d_h2f(row + 4 * b + 2);
        uint8_t sc = row[4 * nb + 16 * b + 8 * n + 2 * s + h];
        float dl = d * (float)(sc & 0xf), ml = dmin * (float)(sc >> 4);
        uint32_t v[2];
        const uint8_t *q = row + 20 * nb + 64 * b + 32 * n + 16 * h + l0;
        if (narrow) load8<true>(q, v[0], v[1]);
        else load8<false>(q, v[0], v[1]);
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = dl * u_code((v[i / 4] >> (8 * (i % 4) + 2 * s)) & 3) - ml;
        break;
    }
    case DS4_TYPE_Q4_K: {
        const uint8_t *b = row + (e0 / 256) * 144;
        int j = e0 % 256, c = j / 64, hi = (j % 64) / 32, l0 = j % 32;
        int sub = 2 * c + hi;
        const uint8_t *s = b + 4;
        uint8_t sc, m;
        if (sub < 4) {
            sc = s[sub] & 63;
            m = s[sub + 4] & 63;
        } else {
            sc = (uint8_t)((s[sub + 4] & 0x0f) | ((s[sub - 4] >> 6) << 4));
            m = (uint8_t)((s[sub + 4] >> 4) | ((s[sub] >> 6) << 4));
        }
        float d = d_h2f(b) * (float)sc, mn = d_h2f(b + 2) * (float)m;
        const uint16_t *q = (const uint16_t *)(b + 16 + 32 * c + l0);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            uint16_t v = q[k] >> (hi ? 4 : 0);
            w[2 * k] = d * (float)(v & 0xf) - mn;
            w[2 * k + 1] = d * (float)((v >> 8) & 0xf) - mn;
        }
        break;
    }
    case DS4_TYPE_IQ2_XXS: {
        int nb = n_in / 256, b = e0 / 256, j = e0 % 256, ib = j / 32, k = (j % 32) / 8;
        const uint8_t *qs = row + 2 * nb + 64 * b + 8 * ib;
        uint32_t a0, a1;
        if (narrow) load8<true>(qs, a0, a1);
        else load8<false>(qs, a0, a1);
        float db = d_h2f(row + 2 * b) * (0.5f + (float)(a1 >> 28)) * 0.25f;
        uint64_t grid = d_iq2_grid[(a0 >> (8 * k)) & 0xff];
        uint32_t signs = d_iq2_signs[(a1 >> (7 * k)) & 127];
#pragma unroll
        for (int i = 0; i < 8; i++) {   /* db * g, negated by its sign bit: db * g * -1 exactly */
            float g = u_code((uint32_t)(grid >> (8 * i)) & 0xff);
            w[i] = __uint_as_float(__float_as_uint(db * g) ^ (((signs >> i) & 1u) << 31));
        }
        break;
    }
    default:
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = __int_as_float(0x7fc00000);
    }
}
