"""The qat-mode round trips (forward-pass.md §3.8) against ml_dtypes and scipy."""
import ml_dtypes
import numpy as np
import pytest
import scipy.linalg

from ds4.native import ffi, lib


def native(fn, v):
    v = np.ascontiguousarray(v, dtype=np.float32).copy()
    fn(ffi.from_buffer("float[]", v), len(v))
    return v


def test_fp8_e4m3_rounding_equals_ml_dtypes():
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.uniform(-448, 448, 20000), rng.normal(0, 1e-2, 20000),
                        rng.normal(0, 2**-8, 5000), [0.0, -0.0, 448.0, -448.0, 2**-9, 2**-10]])
    y = y.astype(np.float32)
    # exact ties: midpoints between neighbouring codes must go to the even code
    codes = np.arange(0, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    y = np.concatenate([y, ((codes[:-1] + codes[1:]) / 2).astype(np.float32)])
    want = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.array([lib.ds4_round_fp8_e4m3(float(v)) for v in y], dtype=np.float32)
    np.testing.assert_array_equal(got, want)


def test_fp4_e2m1_rounding_equals_ml_dtypes():
    rng = np.random.default_rng(1)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    y = np.concatenate([rng.uniform(-6, 6, 20000), (grid[:-1] + grid[1:]) / 2,
                        -(grid[:-1] + grid[1:]) / 2, grid, -grid]).astype(np.float32)
    want = y.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    got = np.array([lib.ds4_round_fp4_e2m1(float(v)) for v in y], dtype=np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [32, 128])
def test_hadamard_equals_scipy_sylvester_matrix(n):
    v = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    want = scipy.linalg.hadamard(n).astype(np.float64) @ v.astype(np.float64) / np.sqrt(n)
    np.testing.assert_allclose(native(lib.ds4_hadamard, v), want, rtol=1e-5, atol=1e-5)


def fp8_blocks_reference(v):
    """§3.8 Q1 written from the spec, with ml_dtypes doing the E4M3 rounding."""
    out = v.astype(np.float32).copy()
    for b in range(0, len(v), 64):
        blk = out[b:b + 64]
        ratio = np.float32(max(np.abs(blk).max(), np.float32(1e-4))) * np.float32(1 / 448)
        s = np.float32(2.0 ** np.ceil(np.log2(np.float64(ratio))))
        y = np.clip(blk / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        out[b:b + 64] = y * s
    return out


def fp4_reference(v):
    out = (scipy.linalg.hadamard(len(v)) @ v.astype(np.float64) / np.sqrt(len(v))).astype(np.float32)
    for b in range(0, len(v), 32):
        blk = out[b:b + 32]
        ratio = np.float32(max(np.abs(blk).max(), np.float32(6 * 2.0**-126))) * np.float32(1 / 6)
        s = np.float32(2.0 ** np.ceil(np.log2(np.float64(ratio))))
        out[b:b + 32] = np.clip(blk / s, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s
    return out


def test_fp8_block_round_trip_equals_reference():
    rng = np.random.default_rng(2)
    for scale in (1e-3, 1.0, 30.0, 1e4):
        v = (rng.standard_normal(448) * scale).astype(np.float32)
        v[5] = np.float32(448 * 2.0)     # a block whose ratio is an exact power of two
        np.testing.assert_array_equal(native(lib.ds4_qat_fp8_blocks, v), fp8_blocks_reference(v))


def test_hadamard_fp4_round_trip_equals_reference():
    rng = np.random.default_rng(3)
    for scale in (1e-2, 1.0, 50.0):
        v = (rng.standard_normal(128) * scale).astype(np.float32)
        np.testing.assert_allclose(native(lib.ds4_qat_hadamard_fp4, v), fp4_reference(v),
                                   rtol=0, atol=1e-6 * scale)


# --------------------------------------------------------------------------
# qat-q8: activations as ggml quantizes them for quantized products
# --------------------------------------------------------------------------

def act8(weight_type, v):
    v = np.ascontiguousarray(v, dtype=np.float32).copy()
    rounded = lib.ds4_act8_round(weight_type, ffi.from_buffer("float[]", v), len(v))
    return rounded, v


def activations(seed, n):
    """Blocks of several magnitudes, an all-zero block, exact ties of the code grid."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(n).astype(np.float32) * np.repeat(
        np.float32([1e-3, 1.0, 40.0, 1e4]), n // 4)
    v[256:512] = 0
    v[600] = np.float32(12.7)            # amax 12.7: d = 0.1, 0.05 sits on a half code
    v[601:608] = np.float32(0.05)
    return v


def test_act8_for_q8_0_weights_is_gguf_py_q8_0_round_trip():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    x = activations(5, 2048)
    want = dequantize(quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    rounded, got = act8(lib.DS4_TYPE_Q8_0, x)
    assert rounded == 1
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("weight_type", ["DS4_TYPE_Q2_K", "DS4_TYPE_Q4_K", "DS4_TYPE_IQ2_XXS"])
def test_act8_for_block_weights_is_ggml_q8_k_round_trip(weight_type):
    from test_quants import numpy_q8_k   # the numpy transcription of ggml's rule
    x = activations(6, 2048)
    blocks = numpy_q8_k(x).reshape(-1, 292)
    d = blocks[:, :4].copy().view("<f4")
    qs = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    want = (qs * d).reshape(-1)
    rounded, got = act8(getattr(lib, weight_type), x)
    assert rounded == 1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("weight_type", ["DS4_TYPE_F32", "DS4_TYPE_F16", "DS4_TYPE_BF16"])
def test_act8_leaves_x_of_float_weights_alone(weight_type):
    x = activations(7, 2048)
    rounded, got = act8(getattr(lib, weight_type), x)
    assert rounded == 0
    np.testing.assert_array_equal(got, x)
