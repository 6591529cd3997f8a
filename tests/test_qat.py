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

