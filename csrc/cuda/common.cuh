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

/* A matrix on the device: rows of n_in elements of `type`. */
struct dmat {
    const uint8_t *data;
    int type;
    int n_in, n_out;
    int64_t row_bytes;
};

static inline dmat dmat_of(const ds4_tensor &t) {
    dmat m = {(const uint8_t *)t.data, t.type, (int)t.ne[0], (int)(t.n_dims > 1 ? t.ne[1] : 1),
              t.row_bytes};
    return m;
}

/* ---- device dequantization: 8 consecutive elements at e0 of a row ----
 * e0 is a multiple of 8, so the 8 never straddle a block of any type.
 * Quantized blocks are only 2-byte aligned (34, 66, 84-byte blocks): 16-bit
 * loads; float rows (n_in % 8 == 0, check_shapes) take 16-byte loads. */

__device__ __forceinline__ float d_h2f(const uint8_t *p) {
    return __half2float(__ushort_as_half(*(const uint16_t *)p));
}

__device__ __forceinline__ uint32_t d_u32(const uint8_t *p) {
    const uint16_t *q = (const uint16_t *)p;
    return (uint32_t)q[0] | ((uint32_t)q[1] << 16);
}

/* IQ2_XXS tables, filled from iq2_tables.h at model init (one translation unit) */
__device__ uint64_t d_iq2_grid[256];
__device__ uint8_t d_iq2_signs[128];

__device__ __forceinline__ void deq8(int type, const uint8_t *row, int e0, float *w) {
    switch (type) {
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
        const uint8_t *b = row + (e0 / 32) * 34;
        float d = d_h2f(b);
        const uint16_t *q = (const uint16_t *)(b + 2 + e0 % 32);   /* 2-byte aligned */
#pragma unroll
        for (int j = 0; j < 4; j++) {
            uint16_t v = q[j];
            w[2 * j] = (float)(int8_t)(v & 0xff) * d;
            w[2 * j + 1] = (float)(int8_t)(v >> 8) * d;
        }
        break;
    }
    case DS4_TYPE_Q2_K: {
        const uint8_t *b = row + (e0 / 256) * 84;
        int j = e0 % 256, n = j / 128, s = (j % 128) / 32, h = (j % 32) / 16, l0 = j % 16;
        float d = d_h2f(b + 80), dmin = d_h2f(b + 82);
        uint8_t sc = b[8 * n + 2 * s + h];
        float dl = d * (float)(sc & 0xf), ml = dmin * (float)(sc >> 4);
        const uint16_t *q = (const uint16_t *)(b + 16 + 32 * n + 16 * h + l0);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            uint16_t v = q[k];
            w[2 * k] = dl * (float)((v >> (2 * s)) & 3) - ml;
            w[2 * k + 1] = dl * (float)((v >> (8 + 2 * s)) & 3) - ml;
        }
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
        const uint8_t *b = row + (e0 / 256) * 66;
        int j = e0 % 256, ib = j / 32, k = (j % 32) / 8;
        const uint8_t *qs = b + 2 + 8 * ib;
        uint32_t a0 = d_u32(qs), a1 = d_u32(qs + 4);
        float db = d_h2f(b) * (0.5f + (float)(a1 >> 28)) * 0.25f;
        uint64_t grid = d_iq2_grid[(a0 >> (8 * k)) & 0xff];
        uint8_t signs = d_iq2_signs[(a1 >> (7 * k)) & 127];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float g = (float)((grid >> (8 * i)) & 0xff);
            w[i] = db * g * ((signs >> i) & 1 ? -1.0f : 1.0f);
        }
        break;
    }
    default:
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = __int_as_float(0x7fc00000);
    }
}
