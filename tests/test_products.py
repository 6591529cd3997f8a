"""One weight matrix's product on each backend (ds4_model_product) against
float64 numpy on gguf-py's dequantized weights, with x rounded by the
independent references of the numeric mode (gguf-py's Q8_0 round trip and
the numpy transcription of ggml's Q8_K for qat-q8).

Why products and not logits for qat-q8: every quantized product rounds its x
to int8 codes, and on these random-weight models one code moved by a last-bit
difference grows through the layers (the CPU engine's own scalar and SIMD
kernels give logits 38-52% apart in qat-q8), so whole-model comparisons
cannot tell a kernel error from that. A single product, on the same x bits,
rounds identically on both sides and must agree to float32 accumulation."""
import functools

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

import ds4
from ds4.native import ffi, lib
from ds4.testing import ModelConfig, read_dequantized, write_model
from test_quants import numpy_q8_k

NUMERICS = {"exact": lib.DS4_NUMERICS_EXACT, "qat-q8": lib.DS4_NUMERICS_QAT_Q8}
REL_TOL = 2e-5


@pytest.fixture(scope="module")
def wide_q2(tmp_path_factory):
    """Flash's row widths (the GPU's int8 chunk and decode kernels need n_in a
    multiple of 1024 for IQ2_XXS / Q2_K rows)."""
    path = tmp_path_factory.mktemp("models") / "wide-q2.gguf"
    write_model(path, ModelConfig.tiny(n_embd=1024, expert_ff=2048, q_lora_rank=2048, n_head=8,
                                       o_groups=4, o_lora_rank=2048, head_dim=512),
                variant="q2", seed=7)
    return path


# (layer, weights.h name, GGUF tensor, expert, parts, shared x): Q8_0 dense,
# IQ2_XXS and Q2_K experts; Q8_0 batches as the forward runs them: the
# grouped output projection (4 groups, each on its own x) and a pair of
# matrices on one x (the shared expert's gate and up; here q_b's two halves)
MATRICES = [(0, "attn_q_a", "blk.0.attn_q_a.weight", 0, 1, False),
            (1, "attn_output_b", "blk.1.attn_output_b.weight", 0, 1, False),
            (1, "ffn_gate_exps", "blk.1.ffn_gate_exps.weight", 3, 1, False),
            (2, "ffn_down_exps", "blk.2.ffn_down_exps.weight", 5, 1, False),
            (1, "attn_output_a", "blk.1.attn_output_a.weight", 0, 4, False),
            (2, "attn_q_b", "blk.2.attn_q_b.weight", 0, 2, True),
            # F16 (k_linear_f16s on the GPU): the compressor's kv rows and the
            # indexer's queries (x of q_lora_rank) on 64-row tiles, the indexer
            # compressor's 64 rows on a 128-row tile (rows past the end), and
            # the compressor's kv rows as a pair on one x
            (4, "comp_kv", "blk.4.attn_compressor_kv.weight", 0, 1, False),
            (4, "idx_q_b", "blk.4.indexer.attn_q_b.weight", 0, 1, False),
            (4, "idx_comp_kv", "blk.4.indexer_compressor_kv.weight", 0, 1, False),
            (4, "comp_kv", "blk.4.attn_compressor_kv.weight", 0, 2, True)]


def act8_reference(x, gguf_type):
    """x as qat-q8 hands it to a product with weights of gguf_type."""
    if gguf_type == GGMLQuantizationType.Q8_0:
        return dequantize(quantize(x.reshape(-1), GGMLQuantizationType.Q8_0),
                          GGMLQuantizationType.Q8_0).reshape(x.shape)
    blocks = numpy_q8_k(x.reshape(-1)).reshape(-1, 292)
    d = blocks[:, :4].copy().view("<f4")
    return (blocks[:, 4:260].copy().view(np.int8).astype(np.float32) * d).reshape(x.shape)


@functools.lru_cache(maxsize=4)
def weight_types(path):
    """Each tensor's type in the file (read once: a reader parses the whole file)."""
    from gguf import GGUFReader
    return {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}


def check_products(model, path, n, numerics):
    weights = read_dequantized(path, [m[2] for m in MATRICES])
    rng = np.random.default_rng(n)
    for layer, name, tensor, expert, parts, shared in MATRICES:
        w = weights[tensor]
        w = w[expert] if w.ndim == 3 else w
        n_out, n_in = w.shape
        x_parts = 1 if shared else parts
        # activations of mixed block magnitudes, as a residual stream has
        x = (rng.standard_normal((n, x_parts * n_in))
             * rng.choice([1e-2, 1.0, 30.0], (n, x_parts * n_in // 32)).repeat(32, 1)).astype(np.float32)
        y = np.empty((n, n_out), dtype=np.float32)
        err = ffi.new("char[256]")
        rc = lib.ds4_model_product(model._m, layer, name.encode(), expert, parts, shared, NUMERICS[numerics],
                                   ffi.from_buffer("float[]", x), n, ffi.from_buffer("float[]", y),
                                   err, len(err))
        assert rc == 0, ffi.string(err).decode()
        wtype = weight_types(path)[tensor]
        rounds = numerics != "exact" and wtype != GGMLQuantizationType.F16   # qat-q8 rounds no F16 product's x
        xin = act8_reference(x, wtype) if rounds else x
        xin = xin.astype(np.float64).reshape(n, x_parts, n_in)
        stretch = n_out // parts   # stretch p of W's rows on x part p (or on the one x)
        ref = np.concatenate([xin[:, 0 if shared else p] @ w[p * stretch:(p + 1) * stretch].astype(np.float64).T
                              for p in range(parts)], axis=1)
        rel = float((np.abs(y - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())
        shape = f"{parts} parts{' on one x' if shared else ''}, " if parts > 1 else ""
        print(f"\n{model.backend} product {tensor} [{shape}{n} x {n_in} -> {n_out}] {numerics}: max rel {rel:.2e}")
        assert rel <= REL_TOL, f"{model.backend} {tensor} {numerics} n={n}: max rel {rel:.2e}"


@pytest.mark.parametrize("numerics", sorted(NUMERICS))
def test_cpu_products_match_float64_of_dequantized_weights(wide_q2, numerics):
    with ds4.load(wide_q2, backend="cpu", ctx=64) as m:
        for n in (1, 3):
            check_products(m, wide_q2, n, numerics)


@pytest.mark.gpu
@pytest.mark.parametrize("numerics", sorted(NUMERICS))
def test_cuda_products_match_float64_of_dequantized_weights(wide_q2, numerics):
    """n = 1: the decode kernels; n = 70 and 200: the chunk kernels, a token
    tile left partly empty, and (200) more tokens than one tile."""
    from test_cuda import _cuda_model
    m = _cuda_model(wide_q2, 64)
    for n in (1, 70, 200):
        check_products(m, wide_q2, n, numerics)


def test_product_of_an_unknown_matrix_is_a_clear_error(tiny_q2):
    with ds4.load(tiny_q2, backend="cpu", ctx=64) as m:
        err = ffi.new("char[256]")
        x = np.zeros(m.config.n_embd, dtype=np.float32)
        y = np.zeros(64, dtype=np.float32)
        assert lib.ds4_model_product(m._m, 0, b"no_such", 0, 1, 0, 0, ffi.from_buffer("float[]", x), 1,
                                     ffi.from_buffer("float[]", y), err, len(err)) == -1
        assert "no matrix no_such" in ffi.string(err).decode()


def test_product_in_parts_that_do_not_divide_the_rows_is_a_clear_error(tiny_q2):
    with ds4.load(tiny_q2, backend="cpu", ctx=64) as m:
        err = ffi.new("char[256]")
        x = np.zeros(m.config.n_embd, dtype=np.float32)
        y = np.zeros(m.config.q_lora_rank, dtype=np.float32)
        parts = m.config.q_lora_rank + 1
        assert lib.ds4_model_product(m._m, 0, b"attn_q_a", 0, parts, 1, 0, ffi.from_buffer("float[]", x), 1,
                                     ffi.from_buffer("float[]", y), err, len(err)) == -1
        assert f"{parts} parts of {m.config.q_lora_rank} rows" in ffi.string(err).decode()


def check_f16_tokens_at_extreme_scales(model, path):
    """An F16 matrix's chunk product (70 tokens) on tokens of 1e-30 and 1e30, a
    zero token and one with an infinite element: k_linear_f16s scales each
    token by its own power of two, so every finite token keeps float32's
    relative precision, a zero token gives exact zeros, and an infinite element
    gives +-inf (NaN under a zero weight), as float64 does."""
    tensor = "blk.4.attn_compressor_kv.weight"
    w = read_dequantized(path, [tensor])[tensor].astype(np.float64)
    n_out, n_in = w.shape
    scales = np.resize([1e-30, 1e30, 1.0, 0.0, 1.0], 70)
    x = (np.random.default_rng(5).standard_normal((70, n_in)) * scales[:, None]).astype(np.float32)
    x[4, 7] = np.inf
    y = np.empty((70, n_out), dtype=np.float32)
    err = ffi.new("char[256]")
    rc = lib.ds4_model_product(model._m, 4, b"comp_kv", 0, 1, 0, NUMERICS["exact"], ffi.from_buffer("float[]", x),
                               70, ffi.from_buffer("float[]", y), err, len(err))
    assert rc == 0, ffi.string(err).decode()
    with np.errstate(invalid="ignore"):
        ref = x.astype(np.float64) @ w.T
    zero, inf_row = scales == 0, 4
    finite = ~zero
    finite[inf_row] = False
    rel = np.abs(y[finite] - ref[finite]).max(axis=1) / np.abs(ref[finite]).max(axis=1)
    print(f"\n{model.backend} F16 product, tokens of 1e-30 .. 1e30: max rel {rel.max():.2e}")
    assert rel.max() <= REL_TOL
    assert (y[zero] == 0).all()
    assert np.array_equal(np.isnan(y[inf_row]), np.isnan(ref[inf_row]))
    assert np.array_equal(y[inf_row][np.isinf(ref[inf_row])], ref[inf_row][np.isinf(ref[inf_row])])


def test_cpu_f16_product_of_tokens_at_extreme_scales(wide_q2):
    with ds4.load(wide_q2, backend="cpu", ctx=64) as m:
        check_f16_tokens_at_extreme_scales(m, wide_q2)


@pytest.mark.gpu
def test_cuda_f16_product_of_tokens_at_extreme_scales(wide_q2):
    from test_cuda import _cuda_model
    check_f16_tokens_at_extreme_scales(_cuda_model(wide_q2, 64), wide_q2)
