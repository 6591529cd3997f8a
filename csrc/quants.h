/* Quantization formats: type table, scalar reference dequantizers, and the
 * dot / matvec kernels (scalar reference next to each SIMD kernel).
 *
 * Byte layouts: spec/gguf-layout.md §4. Block structs, fp16 helpers and the
 * IQ2_XXS tables live in the internal headers quants_internal.h and
 * iq2_tables.h. Nothing here aborts: bad arguments give -1 (or NaN for the
 * functions returning a float). */
#ifndef DS4_QUANTS_H
#define DS4_QUANTS_H

#include <stddef.h>
#include <stdint.h>

/* GGML type ids as stored in GGUF files. */
enum ds4_type {
    DS4_TYPE_F32 = 0,
    DS4_TYPE_F16 = 1,
    DS4_TYPE_Q8_0 = 8,
    DS4_TYPE_Q2_K = 10,
    DS4_TYPE_Q4_K = 12,
    DS4_TYPE_Q8_K = 15,
    DS4_TYPE_IQ2_XXS = 16,
    DS4_TYPE_I32 = 26,
    DS4_TYPE_BF16 = 30
};

/* Block geometry; 0 for a type ds4 does not know. */
int64_t ds4_type_block_elems(int type);
int64_t ds4_type_block_bytes(int type);
const char *ds4_type_name(int type);
/* Bytes of n elements, or -1 when n is not a whole number of blocks. */
int64_t ds4_type_nbytes(int type, int64_t n);

/* ---- SIMD dispatch ----------------------------------------------------
 * Level 0: portable scalar kernels. Level 1: AVX2 + FMA + F16C kernels
 * (x86-64, chosen at run time). The default is the best the CPU has;
 * ds4_set_simd_level clamps the request to [0, that level]. Process-wide. */
int ds4_simd_level(void);
int ds4_simd_level_max(void);
void ds4_set_simd_level(int level);

/* ---- scalar conversions (exact; NaN payloads kept as numpy keeps them) -- */
float ds4_fp16_to_fp32(uint16_t h);
float ds4_bf16_to_fp32(uint16_t h);
uint16_t ds4_fp32_to_fp16(float f); /* round to nearest even */
void ds4_fp16_to_fp32_row(const uint16_t *src, float *dst, int64_t n);
void ds4_fp32_to_fp16_row(const float *src, uint16_t *dst, int64_t n);

/* IQ2_XXS tables as compiled in: 256 grid entries (8 magnitude bytes each,
 * little-endian u64) and the 128 sign bytes. For tests. */
const uint64_t *ds4_iq2xxs_grid(void);
const uint8_t *ds4_iq2xxs_ksigns(void);

/* ---- dequantization (scalar reference) ---------------------------------
 * F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS (and Q8_K). Bit-exact with
 * gguf-py's gguf.quants.dequantize. src holds n elements (whole blocks).
 * Returns 0, or -1 for an unsupported type or n not a whole number of
 * blocks. */
int ds4_dequantize(int type, const void *src, float *dst, int64_t n);

/* ---- Q8_K activations ---------------------------------------------------
 * Per block of 256: max = the value of largest magnitude (first one on
 * ties), iscale = -127/max, qs = min(127, round-half-even(iscale*x)),
 * d = 1/iscale, bsums = sums of 16 qs (ggml quantize_row_q8_K_ref). An
 * all-zero block, or one so small that iscale overflows (|max| < 127 /
 * FLT_MAX), is stored as zeros (d = 0). Inputs must be finite (inf or NaN
 * give unspecified quants, never a crash). Returns 0, or -1 when
 * n % 256 != 0. */
int64_t ds4_q8_k_nbytes(int64_t n);
int ds4_quantize_q8_k(const float *x, void *dst, int64_t n);

/* ---- Q8_0 activations (qat-q8 mode, for Q8_0 weights) --------------------
 * Per block of 32 (ggml quantize_row_q8_0_ref, qat_round.h's rule, which
 * CUDA's k_act8 shares): d = amax / 127, q = roundf(x * (1 / d)), d stored as
 * fp16; an all-zero block is all zeros. Returns 0, or -1 when n % 32 != 0.
 * ds4_vec_dot_q8_0_q8_0: Q8_0 weights against such blocks, the codes'
 * integer dot a block times both scales (ggml style); _ref the scalar
 * kernel. n % 32 != 0 gives NaN. */
int ds4_quantize_q8_0(const float *x, void *dst, int64_t n);
float ds4_vec_dot_q8_0_q8_0(const void *w_row, const void *x_q8_0, int64_t n);
float ds4_vec_dot_q8_0_q8_0_ref(const void *w_row, const void *x_q8_0, int64_t n);

/* ---- dot products of one weight row with activations --------------------
 * w_row holds n elements of `type`. Unsupported type or bad n gives NaN.
 *
 * ds4_vec_dot_f32: float32 activations; F32, F16, BF16, Q8_0, Q2_K, Q4_K,
 * IQ2_XXS. The fast version accumulates in float32 (SIMD or scalar per
 * ds4_simd_level). The reference dequantizes exactly (ds4_dequantize) and
 * accumulates the products in double, rounding once at the end.
 *
 * ds4_vec_dot_q8_k: Q8_K activations (n % 256 == 0); Q8_0, Q2_K, Q4_K,
 * IQ2_XXS. Integer dot products of the quants, scaled per block in float
 * (ggml style). The reference is the scalar integer kernel. */
float ds4_vec_dot_f32(int type, const void *w_row, const float *x, int64_t n);
float ds4_vec_dot_f32_ref(int type, const void *w_row, const float *x, int64_t n);
/* ds4_vec_dot_f32 of one row with two activation vectors: out[0] for x0,
 * out[1] for x1, each the very bits ds4_vec_dot_f32 gives it (a prefill
 * chunk's rows decoded once for two tokens). 0, or -1 (and NaNs) on bad
 * arguments. */
int ds4_vec_dot2_f32(int type, const void *w_row, const float *x0, const float *x1, int64_t n, float *out);
float ds4_vec_dot_q8_k(int type, const void *w_row, const void *x_q8k, int64_t n);
float ds4_vec_dot_q8_k_ref(int type, const void *w_row, const void *x_q8k, int64_t n);
/* The same two tokens at a time: out[t] the bits ds4_vec_dot_q8_k (and
 * ds4_vec_dot_q8_0_q8_0) gives x_t. 0, or -1 (and NaNs) on bad arguments. */
int ds4_vec_dot2_q8_k(int type, const void *w_row, const void *x0_q8k, const void *x1_q8k, int64_t n, float *out);
int ds4_vec_dot2_q8_0_q8_0(const void *w_row, const void *x0_q8_0, const void *x1_q8_0, int64_t n, float *out);

/* ---- matrix x vector ------------------------------------------------------
 * w: n_rows contiguous rows of n elements (row stride ds4_type_nbytes(type,
 * n)); y[r] = dot(row r, x) with the fast kernel. The _rows variants compute
 * only rows [row_begin, row_end) (y indexed by absolute row), so callers can
 * split the work between threads. Return 0, or -1 on bad arguments (nothing
 * written). Single-threaded. */
int ds4_matvec_f32(int type, const void *w, int64_t n_rows, int64_t n,
                   const float *x, float *y);
int ds4_matvec_q8_k(int type, const void *w, int64_t n_rows, int64_t n,
                    const void *x_q8k, float *y);
int ds4_matvec_f32_rows(int type, const void *w, int64_t n, const float *x,
                        float *y, int64_t row_begin, int64_t row_end);
int ds4_matvec_q8_k_rows(int type, const void *w, int64_t n, const void *x_q8k,
                         float *y, int64_t row_begin, int64_t row_end);

#endif
