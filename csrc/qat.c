/* Simulated FP8 / FP4 quantization (qat mode). */
#include "qat.h"
#include "qat_round.h"

#include <math.h>

#include "quants.h"

float ds4_round_fp8_e4m3(float y) { return qat_round_fp8(y); }

float ds4_round_fp4_e2m1(float y) { return qat_round_fp4(y); }

void ds4_qat_fp8_blocks(float *v, int64_t n) {
    for (int64_t b = 0; b < n; b += 64) {
        int64_t len = n - b < 64 ? n - b : 64;
        float amax = 0;
        for (int64_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(v[b + i]));
        float s = qat_fp8_scale(amax);
        for (int64_t i = 0; i < len; i++) v[b + i] = qat_round_fp8(v[b + i] / s) * s;
    }
}

void ds4_hadamard(float *v, int64_t n) {
    for (int64_t h = 1; h < n; h *= 2)
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
    float scale = 1.0f / sqrtf((float)n);
    for (int64_t i = 0; i < n; i++) v[i] *= scale;
}

void ds4_qat_hadamard_fp4(float *v, int64_t n) {
    ds4_hadamard(v, n);
    for (int64_t b = 0; b < n; b += 32) {
        int64_t len = n - b < 32 ? n - b : 32;
        float amax = 0;
        for (int64_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(v[b + i]));
        float s = qat_fp4_scale(amax);
        for (int64_t i = 0; i < len; i++) v[b + i] = qat_round_fp4(v[b + i] / s) * s;
    }
}

int ds4_act8_rounds(int weight_type) {
    return weight_type == DS4_TYPE_Q8_0 || weight_type == DS4_TYPE_Q2_K || weight_type == DS4_TYPE_Q4_K ||
           weight_type == DS4_TYPE_IQ2_XXS;
}
