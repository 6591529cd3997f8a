"""Quantization kernels (csrc/quants*.c) against independent references.

References:
- dequantization: gguf-py's gguf.quants.dequantize, compared bit for bit;
- IQ2_XXS tables: gguf-py's packed grid / ksigns and the SHA-256 fingerprints
  of spec/gguf-layout.md §4;
- Q8_K quantization: a numpy transcription of ggml's quantize_row_q8_K_ref;
- dot products: float64 dots of gguf-py-dequantized weights.
"""
import ctypes
import hashlib
import mmap

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import IQ2_XXS
from gguf.quants import dequantize as gguf_dequantize

import ds4.quants as q
from ds4.errors import Error
from ds4.native import ffi, lib

GRID_SHA256 = "05826b5d3e472a3a78f196be62ac78acf81df0f909626e12ab9fa2a5d490dd54"
KSIGNS_SHA256 = "a76742a603f8beca5212ecce0f1f02f11a4887fd2f7c8b15aca0ea3eb3380c31"

BLOCK_TYPES = ("Q8_0", "Q2_K", "Q4_K", "IQ2_XXS")
ALL_TYPES = ("F32", "F16", "BF16") + BLOCK_TYPES
# Byte offsets of the f16 scale fields inside one block.
F16_FIELDS = {"Q8_0": (0,), "Q2_K": (80, 82), "Q4_K": (0, 2), "IQ2_XXS": (0,)}
LEVELS = [lvl for lvl in (0, 1) if lvl <= q.simd_level_max()]


def geometry(name):
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]]


def reference_dequantize(data, name):
    out = gguf_dequantize(np.asarray(data, dtype=np.uint8).reshape(-1), GGMLQuantizationType[name])
    return np.asarray(out, dtype=np.float32).reshape(-1)


def f16_scales(rng, count, special=True):
    """Finite f16 scales of sensible magnitude; with special=True about a
    quarter are subnormal, zero (+/-) or negative."""
    mag = rng.uniform(2.0**-12, 2.0**-3, count) * rng.choice([1, -1], count)
    vals = mag.astype(np.float16)
    if special:
        kind = rng.integers(0, 8, count)
        sub = (rng.integers(1, 1024, count).astype(np.uint16)
               | (rng.integers(0, 2, count).astype(np.uint16) << 15)).view(np.float16)
        vals = np.where(kind == 0, sub, vals)
        vals = np.where(kind == 1, np.float16(0.0), vals)
        vals = np.where(kind == 2, np.float16(-0.0), vals)
        vals = np.where(kind == 3, -np.abs(vals), vals)
    return vals.astype(np.float16)


def random_blocks(rng, name, n_blocks, special=True):
    """Random bytes with the f16 scale fields set by f16_scales."""
    _, bs = geometry(name)
    data = rng.integers(0, 256, size=(n_blocks, bs), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        data[:, off:off + 2] = f16_scales(rng, n_blocks, special).view(np.uint8).reshape(n_blocks, 2)
    return data


def random_weights(rng, name, n_elems, special=False):
    """Bytes of n_elems weights of type name, finite values."""
    if name == "F32":
        return (rng.standard_normal(n_elems) * 0.05).astype(np.float32).view(np.uint8)
    if name == "F16":
        return (rng.standard_normal(n_elems) * 0.05).astype(np.float16).view(np.uint8)
    if name == "BF16":
        f = (rng.standard_normal(n_elems) * 0.05).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    be, _ = geometry(name)
    return random_blocks(rng, name, n_elems // be, special).reshape(-1)


def assert_same_bits(got, ref, what=""):
    """Equal bit patterns, except that two NaNs match whatever their payload."""
    got = np.asarray(got, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    assert got.shape == ref.shape, what
    both_nan = np.isnan(got) & np.isnan(ref)
    diff = (got.view(np.uint32) != ref.view(np.uint32)) & ~both_nan
    if diff.any():
        i = int(np.flatnonzero(diff)[0])
        pytest.fail(f"{what}: {int(diff.sum())} elements differ; first at {i}: "
                    f"got {got[i]!r} ({got.view(np.uint32)[i]:#010x}), "
                    f"gguf-py {ref[i]!r} ({ref.view(np.uint32)[i]:#010x})")


@pytest.fixture
def simd(request):
    """Run a test at a given SIMD level and restore the default afterwards."""
    before = q.simd_level()
    yield q.set_simd_level
    q.set_simd_level(before)


# --------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", BLOCK_TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_block_dequantize_matches_gguf_py_bit_for_bit(name, seed):
    rng = np.random.default_rng(1000 * seed + len(name))
    be, _ = geometry(name)
    nb = 257
    data = random_blocks(rng, name, nb)
    got = q.dequantize(data.tobytes(), name, nb * be)
    assert got.dtype == np.float32 and got.shape == (nb * be,)
    assert_same_bits(got, reference_dequantize(data, name), name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py's inf*0 on NaN/inf scales
@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_block_dequantize_matches_gguf_py_with_arbitrary_scale_bits(name):
    """Scale fields of any bit pattern (huge, inf, NaN): still identical, NaNs
    compared as NaN."""
    rng = np.random.default_rng(7)
    be, bs = geometry(name)
    nb = 2000
    data = rng.integers(0, 256, size=(nb, bs), dtype=np.uint8)
    got = q.dequantize(data, name, nb * be)
    assert_same_bits(got, reference_dequantize(data, name), name)


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_block_dequantize_with_subnormal_scales_only(name):
    """All scales subnormal: catches a wrong order of the scale products
    (e.g. IQ2_XXS's d*(0.5+ls)*0.25, where *0.25 rounds)."""
    rng = np.random.default_rng(11)
    be, _ = geometry(name)
    nb = 512
    data = random_blocks(rng, name, nb, special=False)
    for off in F16_FIELDS[name]:
        sub = rng.integers(1, 1024, nb).astype(np.uint16) | (rng.integers(0, 2, nb).astype(np.uint16) << 15)
        data[:, off:off + 2] = sub.view(np.uint8).reshape(nb, 2)
    assert_same_bits(q.dequantize(data, name, nb * be), reference_dequantize(data, name), name)


@pytest.mark.parametrize("name", ("F16", "BF16"))
def test_half_dequantize_matches_gguf_py_on_every_bit_pattern(name):
    """All 65536 values, including subnormals, +-0, +-inf and NaN payloads."""
    bits = np.arange(65536, dtype=np.uint16)
    data = bits.view(np.uint8)
    got = q.dequantize(data, name, 65536)
    ref = reference_dequantize(data, name)
    # numpy and ds4 both keep NaN payloads, so compare raw bits everywhere.
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_f32_dequantize_is_the_identity_on_every_bit_class():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 10000, dtype=np.uint64).astype(np.uint32)
    bits[:6] = [0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0x00000001, 0x80000000]
    got = q.dequantize(bits.view(np.uint8), "F32", bits.size)
    assert np.array_equal(got.view(np.uint32), bits)
    assert np.array_equal(got.view(np.uint32), reference_dequantize(bits.view(np.uint8), "F32").view(np.uint32))


def test_dequantize_accepts_names_ids_enums_and_empty_input():
    rng = np.random.default_rng(5)
    data = random_blocks(rng, "Q4_K", 3)
    a = q.dequantize(data.tobytes(), "Q4_K", 768)
    b = q.dequantize(data, 12, 768)
    c = q.dequantize(bytearray(data.tobytes()), GGMLQuantizationType.Q4_K, 768)
    d = q.dequantize(memoryview(data.tobytes()), "q4_k", 768)
    for other in (b, c, d):
        assert np.array_equal(a.view(np.uint32), other.view(np.uint32))
    assert q.dequantize(b"", "Q2_K", 0).shape == (0,)


def test_dequantize_reads_unaligned_buffers():
    rng = np.random.default_rng(6)
    data = random_blocks(rng, "IQ2_XXS", 5).reshape(-1)
    buf = np.zeros(data.size + 1, dtype=np.uint8)
    buf[1:] = data
    got = q.dequantize(buf[1:], "IQ2_XXS", 5 * 256)
    assert_same_bits(got, reference_dequantize(data, "IQ2_XXS"), "IQ2_XXS unaligned")


# --------------------------------------------------------------------------
# Conversions and tables
# --------------------------------------------------------------------------

def test_fp16_to_fp32_is_exact_on_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint16)
    out = np.empty(65536, dtype=np.float32)
    lib.ds4_fp16_to_fp32_row(ffi.cast("uint16_t *", bits.ctypes.data), ffi.cast("float *", out.ctypes.data), 65536)
    assert np.array_equal(out.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))
    assert lib.ds4_fp16_to_fp32(0x3C00) == 1.0
    assert lib.ds4_bf16_to_fp32(0x3F80) == 1.0


def test_fp32_to_fp16_rounds_to_nearest_even_like_numpy():
    rng = np.random.default_rng(8)
    bits = rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32)
    # Concentrate on the f16 range, the subnormal range and the overflow edge.
    exps = rng.integers(100, 145, 200000).astype(np.uint32)
    near = (bits & 0x807FFFFF) | (exps << 23)
    edges = np.array([0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x33000000, 0x33000001,
                      0x337FFFFF, 0x38800000, 0x387FFFFF, 0x387FE000, 0x387FF000, 0x00000001,
                      0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x80000000,
                      0x3F800000, 0x3F801000, 0x3F803000, 0x33C00000, 0x33400000], dtype=np.uint32)
    x = np.concatenate([bits, near, edges]).view(np.float32)
    out = np.empty(x.size, dtype=np.uint16)
    lib.ds4_fp32_to_fp16_row(ffi.cast("float *", x.ctypes.data), ffi.cast("uint16_t *", out.ctypes.data), x.size)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(out[~nan], ref[~nan])
    assert np.isnan(out[nan].view(np.float16)).all()
    assert np.array_equal(out[nan] & 0x8000, ref[nan] & 0x8000)
    assert lib.ds4_fp32_to_fp16(1.0) == 0x3C00


def test_iq2_xxs_tables_match_gguf_py_and_spec_fingerprints():
    grid = bytes(ffi.buffer(lib.ds4_iq2xxs_grid(), 256 * 8))
    ksigns = bytes(ffi.buffer(lib.ds4_iq2xxs_ksigns(), 128))
    assert hashlib.sha256(grid).hexdigest() == GRID_SHA256
    assert hashlib.sha256(ksigns).hexdigest() == KSIGNS_SHA256
    assert ksigns == IQ2_XXS.ksigns
    IQ2_XXS.init_grid()
    gguf_grid = np.asarray(IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
    ours = np.frombuffer(grid, dtype=np.uint8).reshape(256, 8).astype(np.float32)
    assert np.array_equal(ours, gguf_grid)
    g = np.frombuffer(grid, dtype="<u8")
    assert int(g[0]) == 0x0808080808080808 and int(g[255]) == 0x2B2B2B1908081908


# --------------------------------------------------------------------------
# Q8_K activation quantization
# --------------------------------------------------------------------------

def numpy_q8_k(x):
    """ggml quantize_row_q8_K_ref in numpy: signed value of largest magnitude
    (first on ties), iscale = -127/max in float32, qs = min(127, rint(iscale*x)),
    d = 1/iscale, bsums = sums of 16. An all-zero block, or one whose iscale
    overflows to inf (ds4's addition to the ggml rule), is all zeros."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 256)
    nb = xb.shape[0]
    ax = np.abs(xb)
    idx = np.argmax(ax, axis=1)
    mx = xb[np.arange(nb), idx]
    zero = ax[np.arange(nb), idx] == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.where(zero, np.float32(0), np.float32(-127.0) / np.where(zero, np.float32(1), mx))
        iscale = iscale.astype(np.float32)
        zero |= ~np.isfinite(iscale)
        iscale[zero] = 0
        qs = np.minimum(np.rint(iscale[:, None] * xb), 127).astype(np.int8)
        d = np.where(zero, np.float32(0), np.float32(1.0) / np.where(zero, np.float32(1), iscale)).astype(np.float32)
    qs[zero] = 0
    bsums = qs.reshape(nb, 16, 16).astype(np.int32).sum(axis=2).astype(np.int16)
    out = np.empty((nb, 292), dtype=np.uint8)
    out[:, :4] = d.astype("<f4").view(np.uint8).reshape(nb, 4)
    out[:, 4:260] = qs.view(np.uint8)
    out[:, 260:] = bsums.astype("<i2").view(np.uint8).reshape(nb, 32)
    return out.reshape(-1)


def test_q8_k_quantization_matches_numpy_ggml_rule():
    rng = np.random.default_rng(9)
    blocks = [rng.standard_normal(256) * s for s in (1e-3, 1.0, 37.0, 1e4)]
    blocks.append(np.zeros(256))                           # all zero
    one = np.zeros(256); one[17] = -3.5; blocks.append(one)  # single value
    # Ties at .5 after scaling: max 127 gives iscale == -1 exactly.
    ties = np.arange(-126.5, 129.5, 1.0)[:256].copy(); ties[0] = 127.0; blocks.append(ties)
    ties2 = -ties; blocks.append(ties2)
    dup = rng.standard_normal(256); dup[3] = 5.0; dup[200] = -5.0; blocks.append(dup)  # +-max tie
    blocks.append(rng.standard_normal(256) * 1e-40)        # iscale overflows: zeros
    blocks.append(rng.standard_normal(256) * 1e-36)        # tiny but representable
    x = np.concatenate(blocks).astype(np.float32)
    x = np.concatenate([x, rng.standard_normal(256 * 40).astype(np.float32)])
    got = q.quantize_q8_k(x)
    ref = numpy_q8_k(x)
    assert got.shape == ref.shape
    assert np.array_equal(got, ref)
    assert lib.ds4_q8_k_nbytes(512) == 584


def test_q8_k_quants_stay_in_minus_127_to_127():
    rng = np.random.default_rng(10)
    x = (rng.standard_normal(256 * 64) * rng.uniform(0.01, 100, 256 * 64)).astype(np.float32)
    qs = q.quantize_q8_k(x).reshape(-1, 292)[:, 4:260].view(np.int8)
    assert qs.min() >= -127 and qs.max() <= 127
    assert (np.abs(qs).max(axis=1) == 127).all()


# --------------------------------------------------------------------------
# Dot products and matvec
# --------------------------------------------------------------------------

def widths(name):
    if name in ("F32", "F16", "BF16"):
        return (1, 7, 33, 256, 1000, 4099)
    if name == "Q8_0":
        return (32, 96, 1024, 2048, 4096, 8192)
    return (256, 512, 2048, 4096)


def rel_err(a, b, scale):
    return abs(float(a) - float(b)) / max(float(scale), 1e-30)


TOL = 1e-5


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ALL_TYPES)
def test_dot_f32_activations_match_float64_dot_of_gguf_dequantized(name, level, simd):
    """Fast kernel (at this SIMD level) and the scalar reference vs a float64
    dot of gguf-py-dequantized weights. Error measure: |a-b| / sum |w_i x_i|."""
    simd(level)
    assert q.simd_level() == level
    for n in widths(name):
        for seed in range(6):
            rng = np.random.default_rng(seed * 7919 + n)
            w = random_weights(rng, name, n, special=(seed % 2 == 1))
            x = rng.standard_normal(n).astype(np.float32)
            wd = reference_dequantize(w, name).astype(np.float64)
            exact = float(np.dot(wd, x.astype(np.float64)))
            scale = float(np.abs(wd * x).sum())
            fast = q.vec_dot(name, w, x)
            ref = q.vec_dot(name, w, x, reference=True)
            assert rel_err(fast, exact, scale) <= TOL, (name, n, seed, fast, exact)
            assert rel_err(ref, exact, scale) <= 1e-7, (name, n, seed, ref, exact)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_dot_q8_k_activations_match_integer_reference_and_float64_dot(name, level, simd):
    """Fast kernel vs the scalar integer kernel, and both vs a float64 dot of
    the gguf-py-dequantized weights with the dequantized Q8_K activations
    (d*qs computed here in numpy). Error measure: |a-b| / sum |w_i x_i|."""
    simd(level)
    for n in (256, 512, 1024, 2048, 4096, 8192):
        for seed in range(6):
            rng = np.random.default_rng(seed * 104729 + n)
            w = random_weights(rng, name, n, special=(seed % 2 == 1))
            x = (rng.standard_normal(n) * (10.0 ** rng.uniform(-3, 3))).astype(np.float32)
            xq = q.quantize_q8_k(x)
            blocks = xq.reshape(-1, 292)
            xd = (blocks[:, :4].copy().view("<f4").astype(np.float64)
                  * blocks[:, 4:260].view(np.int8).astype(np.float64)).reshape(-1)
            wd = reference_dequantize(w, name).astype(np.float64)
            exact = float(np.dot(wd, xd))
            scale = float(np.abs(wd * xd).sum())
            fast = q.vec_dot(name, w, xq, activations="q8_k")
            ref = q.vec_dot(name, w, xq, activations="q8_k", reference=True)
            assert rel_err(fast, ref, scale) <= TOL, (name, n, seed, fast, ref)
            assert rel_err(ref, exact, scale) <= TOL, (name, n, seed, ref, exact)
            assert rel_err(fast, exact, scale) <= TOL, (name, n, seed, fast, exact)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ("F16", "BF16"))
def test_half_dot_kernels_convert_every_finite_value_exactly(name, level, simd):
    """Rows of 8 halves times unit vectors pick single weights out exactly,
    so each finite half (subnormals included) must come out as numpy's value."""
    simd(level)
    bits = np.arange(65536, dtype=np.uint16)
    vals = reference_dequantize(bits.view(np.uint8), name)
    bits = bits[np.isfinite(vals)]
    bits = bits[: bits.size // 8 * 8]
    expect = reference_dequantize(bits.view(np.uint8), name).reshape(-1, 8)
    w = bits.view(np.uint8)
    for k in range(8):
        e = np.zeros(8, dtype=np.float32)
        e[k] = 1.0
        y = q.matvec(name, w, e)
        assert np.array_equal(y, expect[:, k]), (name, k)


def test_q8_0_q8_k_kernel_handles_minus_128_weights(simd):
    """Q8_0 quants of -128 (valid in files) against +-127 activations."""
    n = 1024
    nb = n // 32
    blocks = np.zeros((nb, 34), dtype=np.uint8)
    blocks[:, 0:2] = np.full(nb, 0.01, dtype=np.float16).view(np.uint8).reshape(nb, 2)
    blocks[:, 2:] = np.int8(-128).view(np.uint8)
    x = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
    x[5] = 1.0  # not all cancel
    xq = q.quantize_q8_k(x)
    ref = q.vec_dot("Q8_0", blocks, xq, activations="q8_k", reference=True)
    for level in LEVELS:
        simd(level)
        assert q.vec_dot("Q8_0", blocks, xq, activations="q8_k") == pytest.approx(ref, rel=1e-6)
    assert ref == pytest.approx(float(np.float16(0.01)) * -128 * 127 * 2 / 127, rel=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name,activations",
                         [(t, "f32") for t in ALL_TYPES] + [(t, "q8_k") for t in BLOCK_TYPES])
def test_matvec_equals_per_row_dot(name, activations, level, simd):
    simd(level)
    rng = np.random.default_rng(12)
    n, rows = 2048, 9
    w = random_weights(rng, name, n * rows).reshape(rows, -1)
    x = rng.standard_normal(n).astype(np.float32)
    xa = q.quantize_q8_k(x) if activations == "q8_k" else x
    y = q.matvec(name, w, xa, activations=activations)
    assert y.shape == (rows,) and y.dtype == np.float32
    per_row = np.array([q.vec_dot(name, w[r], xa, activations=activations) for r in range(rows)],
                       dtype=np.float32)
    assert np.array_equal(y, per_row)


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.array_equal(a.view(np.uint32), b.view(np.uint32)) or np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name,activations",
                         [(t, "f32") for t in ALL_TYPES] + [(t, "q8_k") for t in BLOCK_TYPES])
def test_dot2_gives_each_token_the_bits_of_its_own_dot(name, activations, level, simd):
    """The two-token kernels (a prefill chunk's rows decoded once for two
    tokens) must leave a token's result exactly what the one-token kernel
    gives it, or a chunk's logits would depend on how its tokens pair up."""
    simd(level)
    for n in widths(name):
        if activations == "q8_k" and n % 256:
            continue
        for seed in range(4):
            rng = np.random.default_rng(seed * 104729 + n)
            w = random_weights(rng, name, n, special=(seed % 2 == 1))
            x0, x1 = (rng.standard_normal(n).astype(np.float32) * 10.0 ** rng.uniform(-3, 3) for _ in range(2))
            if activations == "q8_k":
                x0, x1 = q.quantize_q8_k(x0), q.quantize_q8_k(x1)
            pair = q.vec_dot2(name, w, x0, x1, activations=activations)
            single = [q.vec_dot(name, w, x, activations=activations) for x in (x0, x1)]
            assert _same_bits(pair, single), (name, n, seed, pair, single)


@pytest.mark.parametrize("level", LEVELS)
def test_dot2_q8_0_activations_give_each_token_its_own_bits(level, simd):
    """The same for qat-q8's Q8_0 weights against Q8_0 activation blocks."""
    simd(level)
    for n in (32, 96, 1024, 8192):
        for seed in range(4):
            rng = np.random.default_rng(seed * 7919 + n)
            w = np.ascontiguousarray(random_weights(rng, "Q8_0", n, special=(seed % 2 == 1)))
            xq0, xq1 = (quantize_q8_0((rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32))
                        for _ in range(2))
            wp, p0, p1 = ffi.from_buffer(w), ffi.from_buffer(xq0), ffi.from_buffer(xq1)
            pair = np.empty(2, np.float32)
            assert lib.ds4_vec_dot2_q8_0_q8_0(wp, p0, p1, n, ffi.cast("float *", pair.ctypes.data)) == 0
            single = [lib.ds4_vec_dot_q8_0_q8_0(wp, p, n) for p in (p0, p1)]
            assert _same_bits(pair, single), (n, seed, pair, single)


def test_dot2_rejects_activations_of_different_lengths():
    w = np.zeros(q.nbytes("Q8_0", 64), np.uint8)
    with pytest.raises(q.QuantError):
        q.vec_dot2("Q8_0", w, np.zeros(64, np.float32), np.zeros(32, np.float32))


def test_matvec_rows_computes_only_the_requested_range():
    rng = np.random.default_rng(13)
    n, rows = 512, 6
    w = random_weights(rng, "Q4_K", n * rows)
    x = rng.standard_normal(n).astype(np.float32)
    full = q.matvec("Q4_K", w, x)
    y = np.full(rows, -7.0, dtype=np.float32)
    rc = lib.ds4_matvec_f32_rows(lib.DS4_TYPE_Q4_K, ffi.cast("void *", w.ctypes.data), n,
                                 ffi.cast("float *", x.ctypes.data), ffi.cast("float *", y.ctypes.data), 2, 5)
    assert rc == 0
    assert np.array_equal(y[2:5], full[2:5])
    assert (y[[0, 1, 5]] == -7.0).all()
    xq = q.quantize_q8_k(x)
    fullq = q.matvec("Q4_K", w, xq, activations="q8_k")
    y[:] = -7.0
    rc = lib.ds4_matvec_q8_k_rows(lib.DS4_TYPE_Q4_K, ffi.cast("void *", w.ctypes.data), n,
                                  ffi.cast("void *", xq.ctypes.data), ffi.cast("float *", y.ctypes.data), 1, 3)
    assert rc == 0
    assert np.array_equal(y[1:3], fullq[1:3])
    assert (y[[0, 3, 4, 5]] == -7.0).all()


def _guarded(nbytes_):
    """A writable numpy uint8 array of nbytes_ whose last byte is followed by
    an inaccessible page, so reading past its end crashes."""
    page = mmap.PAGESIZE
    pages = (nbytes_ + page - 1) // page + 1
    mm = mmap.mmap(-1, pages * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + (pages - 1) * page, page, 0) == 0  # PROT_NONE
    start = (pages - 1) * page - nbytes_
    arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes_, offset=start)
    return arr, mm


@pytest.mark.parametrize("level", LEVELS)
def test_kernels_never_read_past_the_row_or_the_activations(level, simd):
    """Rows and activations end right before a PROT_NONE page: any read past
    the last block would crash the test process."""
    simd(level)
    rng = np.random.default_rng(14)
    keep = []
    for name in ALL_TYPES:
        n = 256 + 32 if name == "Q8_0" else (256 if name in BLOCK_TYPES else 263)
        w_src = random_weights(rng, name, n)
        w, mw = _guarded(w_src.size)
        w[:] = w_src
        x_src = rng.standard_normal(n).astype(np.float32)
        xg, mx = _guarded(x_src.nbytes)
        xf = xg.view(np.float32)
        xf[:] = x_src
        keep += [mw, mx]
        tid = q.type_id(name)
        out = np.empty(n, dtype=np.float32)
        assert lib.ds4_dequantize(tid, ffi.cast("void *", w.ctypes.data), ffi.cast("float *", out.ctypes.data), n) == 0
        wp, xp = ffi.cast("void *", w.ctypes.data), ffi.cast("float *", xf.ctypes.data)
        assert np.isfinite(lib.ds4_vec_dot_f32(tid, wp, xp, n))
        assert np.isfinite(lib.ds4_vec_dot_f32_ref(tid, wp, xp, n))
        pair = np.empty(2, dtype=np.float32)   # both tokens' activations end at the guard page
        assert lib.ds4_vec_dot2_f32(tid, wp, xp, xp, n, ffi.cast("float *", pair.ctypes.data)) == 0
        assert np.isfinite(pair).all()
        if name in q.DOT_Q8_K_TYPES:
            nq = n // 256 * 256
            xq_src = q.quantize_q8_k(x_src[:nq])
            xq, mq = _guarded(xq_src.size)
            xq[:] = xq_src
            keep.append(mq)
            qp = ffi.cast("void *", xq.ctypes.data)
            assert np.isfinite(lib.ds4_vec_dot_q8_k(tid, wp, qp, nq))
            assert np.isfinite(lib.ds4_vec_dot_q8_k_ref(tid, wp, qp, nq))
            assert lib.ds4_vec_dot2_q8_k(tid, wp, qp, qp, nq, ffi.cast("float *", pair.ctypes.data)) == 0
            assert np.isfinite(pair).all()
    # The quantizer reads x only up to n.
    xg, mx = _guarded(256 * 4)
    xg.view(np.float32)[:] = rng.standard_normal(256)
    dst = np.empty(292, dtype=np.uint8)
    assert lib.ds4_quantize_q8_k(ffi.cast("float *", xg.ctypes.data), ffi.cast("void *", dst.ctypes.data), 256) == 0


# --------------------------------------------------------------------------
# SIMD level and bad inputs
# --------------------------------------------------------------------------

def test_simd_level_is_clamped_to_what_the_cpu_has(simd):
    top = q.simd_level_max()
    assert top in (0, 1)
    assert simd(99) == top
    assert simd(-3) == 0
    assert simd(0) == 0


@pytest.mark.parametrize("bad", ("Q5_K", "nope", 99, -1, 2.5, None, True))
def test_unknown_type_raises(bad):
    with pytest.raises(q.QuantError) as exc:
        q.dequantize(b"\0" * 34, bad, 32)
    assert isinstance(exc.value, Error) and isinstance(exc.value, ValueError)


def test_known_type_without_dequantizer_raises():
    with pytest.raises(q.QuantError, match="cannot dequantize I32"):
        q.dequantize(b"\0" * 8, "I32", 2)


@pytest.mark.parametrize("name,n,size", [
    ("Q8_0", 32, 33),        # short
    ("Q8_0", 32, 35),        # long
    ("Q2_K", 256, 0),
    ("Q4_K", 100, 144),      # n not a whole number of blocks
    ("IQ2_XXS", 512, 66),
    ("F16", 3, 5),
])
def test_wrong_byte_count_or_partial_block_raises(name, n, size):
    with pytest.raises(q.QuantError):
        q.dequantize(b"\0" * size, name, n)


def test_bad_arguments_to_kernels_raise_or_return_nan():
    with pytest.raises(q.QuantError):
        q.dequantize(b"\0" * 34, "Q8_0", -32)
    with pytest.raises(q.QuantError):
        q.dequantize(np.zeros(34, dtype=np.int8), "Q8_0", 32)
    with pytest.raises(q.QuantError):
        q.quantize_q8_k(np.zeros(100, dtype=np.float32))
    with pytest.raises(q.QuantError):
        q.vec_dot("Q4_K", b"\0" * 143, np.zeros(256, dtype=np.float32))
    with pytest.raises(q.QuantError):
        q.vec_dot("F32", b"\0" * 1024, np.zeros(256, dtype=np.float32), activations="q8_k")
    with pytest.raises(q.QuantError):
        q.vec_dot("Q4_K", b"\0" * 144, np.zeros(256, dtype=np.float32), activations="fp8")
    with pytest.raises(q.QuantError):
        q.vec_dot("Q4_K", b"\0" * 144, np.zeros(291, dtype=np.uint8), activations="q8_k")
    with pytest.raises(q.QuantError):
        q.matvec("Q8_0", b"\0" * 100, np.zeros(32, dtype=np.float32))
    with pytest.raises(q.QuantError):
        q.matvec("Q8_0", b"\0" * 68, np.zeros(32, dtype=np.float32), n_rows=3)
    # The C entry points refuse without touching memory.
    null = ffi.NULL
    assert lib.ds4_dequantize(99, null, null, 32) == -1
    assert lib.ds4_dequantize(lib.DS4_TYPE_Q2_K, null, null, 255) == -1
    assert lib.ds4_dequantize(lib.DS4_TYPE_I32, null, null, 4) == -1
    assert lib.ds4_quantize_q8_k(null, null, 100) == -1
    assert np.isnan(lib.ds4_vec_dot_f32(99, null, null, 32))
    assert np.isnan(lib.ds4_vec_dot_f32(lib.DS4_TYPE_Q8_0, null, null, 33))
    assert np.isnan(lib.ds4_vec_dot_f32_ref(lib.DS4_TYPE_Q8_K, null, null, 256))
    assert np.isnan(lib.ds4_vec_dot_q8_k(lib.DS4_TYPE_F16, null, null, 256))
    assert np.isnan(lib.ds4_vec_dot_q8_k(lib.DS4_TYPE_Q8_0, null, null, 32))
    assert np.isnan(lib.ds4_vec_dot_q8_k_ref(lib.DS4_TYPE_Q4_K, null, null, 100))
    assert lib.ds4_matvec_f32(lib.DS4_TYPE_Q4_K, null, 4, 100, null, null) == -1
    assert lib.ds4_matvec_q8_k(lib.DS4_TYPE_F32, null, 4, 256, null, null) == -1
    assert lib.ds4_matvec_f32_rows(lib.DS4_TYPE_F32, null, 8, null, null, 3, 2) == -1
    assert lib.ds4_matvec_q8_k_rows(lib.DS4_TYPE_Q2_K, null, 256, null, null, -1, 2) == -1


# --------------------------------------------------------------------------
# Q8_0 activations (qat-q8 mode, Q8_0 weights)
# --------------------------------------------------------------------------

def quantize_q8_0(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.size // 32 * 34, dtype=np.uint8)
    assert lib.ds4_quantize_q8_0(ffi.from_buffer("float[]", x), ffi.from_buffer(out), x.size) == 0
    return out


def test_q8_0_activation_blocks_equal_gguf_py_quantize():
    from gguf.quants import quantize
    rng = np.random.default_rng(11)
    for scale in (1e-4, 1.0, 300.0):
        x = (rng.standard_normal(4096) * scale).astype(np.float32)
        x[:32] = 0                                   # an all-zero block
        want = np.asarray(quantize(x, GGMLQuantizationType.Q8_0), dtype=np.uint8).reshape(-1)
        np.testing.assert_array_equal(quantize_q8_0(x), want)
    assert lib.ds4_quantize_q8_0(ffi.NULL, ffi.NULL, 33) == -1


@pytest.mark.parametrize("level", LEVELS)
def test_dot_q8_0_activations_match_reference_and_float64_dot(level, simd):
    """Q8_0 weights (random bytes: -128 codes, subnormal and negative scales)
    against Q8_0 activations: fast vs scalar kernel, both vs a float64 dot of
    gguf-py's dequantization of each side."""
    simd(level)
    for n in (32, 96, 1024, 8192):
        for seed in range(6):
            rng = np.random.default_rng(seed * 7919 + n)
            w = random_weights(rng, "Q8_0", n, special=(seed % 2 == 1))
            x = (rng.standard_normal(n) * (10.0 ** rng.uniform(-3, 3))).astype(np.float32)
            xq = quantize_q8_0(x)
            exact = float(np.dot(reference_dequantize(w, "Q8_0").astype(np.float64),
                                 reference_dequantize(xq, "Q8_0").astype(np.float64)))
            scale = float(np.abs(reference_dequantize(w, "Q8_0").astype(np.float64)
                                 * reference_dequantize(xq, "Q8_0")).sum())
            wp, xp = ffi.from_buffer(np.ascontiguousarray(w)), ffi.from_buffer(xq)
            fast = lib.ds4_vec_dot_q8_0_q8_0(wp, xp, n)
            ref = lib.ds4_vec_dot_q8_0_q8_0_ref(wp, xp, n)
            assert rel_err(fast, ref, scale) <= TOL, (n, seed, fast, ref)
            assert rel_err(ref, exact, scale) <= TOL, (n, seed, ref, exact)
    assert np.isnan(lib.ds4_vec_dot_q8_0_q8_0(ffi.NULL, ffi.NULL, 33))
