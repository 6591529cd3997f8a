/* The simulated quantization steps DeepSeek V4 was trained with
 * (forward-pass.md §3.8), used in the "qat" numeric mode, and which products
 * the "qat-q8" mode's activation rounding applies to. Exposed to Python so
 * tests can compare them with ml_dtypes and scipy. */
#ifndef DS4_QAT_H
#define DS4_QAT_H

#include <stdint.h>

/* Nearest FP8 E4M3FN / FP4 E2M1 value (ties to even), saturating. */
float ds4_round_fp8_e4m3(float y);
float ds4_round_fp4_e2m1(float y);
/* Q1: FP8 round trip of v[0..n) in blocks of 64 with power-of-two scales. */
void ds4_qat_fp8_blocks(float *v, int64_t n);
/* v <- H_n v / sqrt(n), Sylvester order; n a power of two. */
void ds4_hadamard(float *v, int64_t n);
/* Q2: Hadamard then FP4 round trip in blocks of 32. */
void ds4_qat_hadamard_fp4(float *v, int64_t n);

/* qat-q8 (forward-pass.md §8 row 4): whether a product with weights of
 * `weight_type` takes x as ggml quantizes activations, Q8_0 blocks of 32
 * for Q8_0 weights (ds4_quantize_q8_0), Q8_K blocks of 256 for Q2_K / Q4_K /
 * IQ2_XXS (ds4_quantize_q8_k); float weights take x as it is. */
int ds4_act8_rounds(int weight_type);

#endif
