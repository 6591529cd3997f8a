/* The simulated quantization steps DeepSeek V4 was trained with
 * (forward-pass.md §3.8), used in the "qat" numeric mode, and the
 * activation rounding the "qat-q8" mode adds. Exposed to Python so tests
 * can compare them with ml_dtypes, scipy and gguf-py. */
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

/* qat-q8: x (n values) as ggml quantizes it for a product with weights of
 * `weight_type` (forward-pass.md §8 row 4): Q8_0 blocks of 32 for Q8_0
 * weights, Q8_K blocks of 256 for Q2_K / Q4_K / IQ2_XXS; each value becomes
 * its int8 code times the block's scale. Float weights (F32 / F16 / BF16)
 * take x as it is: returns 0 and leaves v alone; else 1. n must be a whole
 * number of blocks (weights of these types always are). */
int ds4_act8_rounds(int weight_type);
int ds4_act8_round(int weight_type, float *v, int64_t n);

#endif
