"""Quantized tensor formats: thin numpy wrappers over the native kernels.

`dequantize` is the public entry point (spec/api.md); the other functions
exist for tests and benchmarks of the C dot / matvec kernels.
"""
from __future__ import annotations

import numpy as np

from .errors import Error
from .native import ffi, lib

__all__ = [
    "QuantError", "TYPES", "type_id", "type_name", "nbytes", "dequantize",
    "quantize_q8_k", "vec_dot", "vec_dot2", "matvec", "simd_level", "simd_level_max",
    "set_simd_level",
]


class QuantError(Error, ValueError):
    """Bad arguments to a quantization function (type, size or shape)."""


# GGML type ids known to the native type table.
TYPES = {
    "F32": lib.DS4_TYPE_F32,
    "F16": lib.DS4_TYPE_F16,
    "Q8_0": lib.DS4_TYPE_Q8_0,
    "Q2_K": lib.DS4_TYPE_Q2_K,
    "Q4_K": lib.DS4_TYPE_Q4_K,
    "Q8_K": lib.DS4_TYPE_Q8_K,
    "IQ2_XXS": lib.DS4_TYPE_IQ2_XXS,
    "I32": lib.DS4_TYPE_I32,
    "BF16": lib.DS4_TYPE_BF16,
}
_NAMES = {v: k for k, v in TYPES.items()}

DEQUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q2_K", "Q4_K", "IQ2_XXS", "Q8_K")
DOT_F32_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q2_K", "Q4_K", "IQ2_XXS")
DOT_Q8_K_TYPES = ("Q8_0", "Q2_K", "Q4_K", "IQ2_XXS")
Q8_K_BLOCK_BYTES = 292
QK_K = 256


def type_id(qtype) -> int:
    """GGML type id of a name ("Q2_K", any case), an int id or an IntEnum."""
    if isinstance(qtype, str):
        tid = TYPES.get(qtype.upper())
        if tid is None:
            raise QuantError(f"unknown quantization type {qtype!r} "
                             f"(known: {', '.join(TYPES)})")
        return tid
    if isinstance(qtype, (int, np.integer)) and not isinstance(qtype, bool):
        if int(qtype) not in _NAMES:
            raise QuantError(f"unknown quantization type id {int(qtype)}")
        return int(qtype)
    raise QuantError(f"quantization type must be a name or an int id, not {type(qtype).__name__}")


def type_name(qtype) -> str:
    return _NAMES[type_id(qtype)]


def nbytes(qtype, n_elements: int) -> int:
    """Bytes of n_elements of qtype (n must be a whole number of blocks)."""
    tid = type_id(qtype)
    n = _count(n_elements, "n_elements")
    nb = lib.ds4_type_nbytes(tid, n)
    if nb < 0:
        raise QuantError(f"{_NAMES[tid]}: {n} elements is not a whole number of "
                         f"{lib.ds4_type_block_elems(tid)}-element blocks")
    return nb


def _count(n, what) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise QuantError(f"{what} must be a non-negative integer, got {n!r}")
    return int(n)


def _as_bytes(data, what="data", align=4) -> np.ndarray:
    """A C-contiguous uint8 view (or aligned copy) of a bytes-like or uint8 array."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise QuantError(f"{what} must be bytes or a uint8 array, not {data.dtype} array")
        arr = data.reshape(-1) if data.flags.c_contiguous else np.ascontiguousarray(data).reshape(-1)
    else:
        try:
            arr = np.frombuffer(data, dtype=np.uint8)
        except TypeError:
            raise QuantError(f"{what} must be bytes or a uint8 array, "
                             f"not {type(data).__name__}") from None
    if arr.size and arr.ctypes.data % align:
        arr = arr.copy()  # numpy allocations are aligned; kernels read 2/4-byte fields
    return arr


def _ptr(arr: np.ndarray, ctype: str = "void *"):
    return ffi.cast(ctype, arr.ctypes.data)


def dequantize(data, qtype, n_elements: int) -> np.ndarray:
    """Dequantize n_elements of qtype from data (bytes or uint8 array of whole
    blocks) into a new float32 array, bit-exact with gguf.quants.dequantize."""
    tid = type_id(qtype)
    name = _NAMES[tid]
    if name not in DEQUANT_TYPES:
        raise QuantError(f"cannot dequantize {name} (supported: {', '.join(DEQUANT_TYPES)})")
    expect = nbytes(tid, n_elements)
    buf = _as_bytes(data)
    if buf.size != expect:
        raise QuantError(f"{name}: {n_elements} elements take {expect} bytes, got {buf.size}")
    out = np.empty(int(n_elements), dtype=np.float32)
    if out.size and lib.ds4_dequantize(tid, _ptr(buf), _ptr(out, "float *"), out.size) != 0:
        raise QuantError(f"native dequantize failed for {name}")  # pragma: no cover
    return out


def _f32_vector(x, what="x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise QuantError(f"{what} must be a 1-D array, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize_q8_k(x) -> np.ndarray:
    """Quantize float32 activations (length a multiple of 256) to Q8_K blocks."""
    x = _f32_vector(x)
    if x.size % QK_K:
        raise QuantError(f"Q8_K needs a multiple of {QK_K} elements, got {x.size}")
    out = np.empty(lib.ds4_q8_k_nbytes(x.size), dtype=np.uint8)
    lib.ds4_quantize_q8_k(_ptr(x, "float *"), _ptr(out), x.size)
    return out


def _activations(x, activations):
    """(pointer-owner array, n, is_q8k) from float activations or Q8_K bytes."""
    if activations == "f32":
        x = _f32_vector(x)
        return x, x.size, False
    if activations == "q8_k":
        if isinstance(x, np.ndarray) and x.dtype == np.uint8 or isinstance(x, (bytes, bytearray, memoryview)):
            xq = _as_bytes(x, "Q8_K activations")
            if xq.size % Q8_K_BLOCK_BYTES:
                raise QuantError(f"Q8_K activations: {xq.size} bytes is not a whole "
                                 f"number of {Q8_K_BLOCK_BYTES}-byte blocks")
            return xq, xq.size // Q8_K_BLOCK_BYTES * QK_K, True
        xq = quantize_q8_k(x)
        return xq, xq.size // Q8_K_BLOCK_BYTES * QK_K, True
    raise QuantError(f"activations must be 'f32' or 'q8_k', not {activations!r}")


def _check_kernel_type(tid, is_q8k):
    name = _NAMES[tid]
    allowed = DOT_Q8_K_TYPES if is_q8k else DOT_F32_TYPES
    if name not in allowed:
        kind = "q8_k" if is_q8k else "f32"
        raise QuantError(f"no {kind} dot kernel for {name} (supported: {', '.join(allowed)})")


def vec_dot(qtype, row, x, activations: str = "f32", reference: bool = False) -> float:
    """Dot product of one weight row (bytes of n elements of qtype) with x.

    activations="f32": x is float32 of length n. activations="q8_k": x is
    float32 (quantized here) or already-quantized Q8_K bytes. reference=True
    runs the scalar reference kernel instead of the dispatched fast one."""
    tid = type_id(qtype)
    xa, n, is_q8k = _activations(x, activations)
    _check_kernel_type(tid, is_q8k)
    w = _as_bytes(row, "row")
    expect = nbytes(tid, n)
    if w.size != expect:
        raise QuantError(f"{_NAMES[tid]}: a row of {n} elements takes {expect} bytes, got {w.size}")
    if is_q8k:
        fn = lib.ds4_vec_dot_q8_k_ref if reference else lib.ds4_vec_dot_q8_k
        return float(fn(tid, _ptr(w), _ptr(xa), n))
    fn = lib.ds4_vec_dot_f32_ref if reference else lib.ds4_vec_dot_f32
    return float(fn(tid, _ptr(w), _ptr(xa, "float *"), n))


def vec_dot2(qtype, row, x0, x1, activations: str = "f32") -> tuple[float, float]:
    """vec_dot of one row with two activation vectors at once (the row decoded
    once, as a prefill chunk multiplies it): each result the bits vec_dot
    gives that vector (activations as vec_dot takes them)."""
    tid = type_id(qtype)
    (xa0, n, is_q8k), (xa1, n1, _) = _activations(x0, activations), _activations(x1, activations)
    _check_kernel_type(tid, is_q8k)
    if n != n1:
        raise QuantError(f"x0 and x1 differ in length ({n}, {n1})")
    w = _as_bytes(row, "row")
    expect = nbytes(tid, n)
    if w.size != expect:
        raise QuantError(f"{_NAMES[tid]}: a row of {n} elements takes {expect} bytes, got {w.size}")
    out = np.empty(2, np.float32)
    if is_q8k:
        rc = lib.ds4_vec_dot2_q8_k(tid, _ptr(w), _ptr(xa0), _ptr(xa1), n, _ptr(out, "float *"))
    else:
        rc = lib.ds4_vec_dot2_f32(tid, _ptr(w), _ptr(xa0, "float *"), _ptr(xa1, "float *"), n, _ptr(out, "float *"))
    if rc != 0:
        raise QuantError(f"native dot2 failed for {_NAMES[tid]}")  # pragma: no cover
    return float(out[0]), float(out[1])


def matvec(qtype, w, x, n_rows: int | None = None, activations: str = "f32",
           out: np.ndarray | None = None) -> np.ndarray:
    """y = W x for W of n_rows rows of qtype (contiguous, bytes or uint8 array),
    with the fast kernel. n is len(x) (or the Q8_K element count)."""
    tid = type_id(qtype)
    xa, n, is_q8k = _activations(x, activations)
    _check_kernel_type(tid, is_q8k)
    wb = _as_bytes(w, "w")
    row_bytes = nbytes(tid, n)
    if n_rows is None:
        if row_bytes == 0 or wb.size % row_bytes:
            raise QuantError(f"{wb.size} bytes is not a whole number of {row_bytes}-byte rows")
        n_rows = wb.size // row_bytes
    n_rows = _count(n_rows, "n_rows")
    if wb.size != n_rows * row_bytes:
        raise QuantError(f"{_NAMES[tid]}: {n_rows} rows of {n} elements take "
                         f"{n_rows * row_bytes} bytes, got {wb.size}")
    if out is None:
        out = np.empty(n_rows, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (n_rows,) or not out.flags.c_contiguous:
        raise QuantError(f"out must be a contiguous float32 array of shape ({n_rows},)")
    if is_q8k:
        rc = lib.ds4_matvec_q8_k(tid, _ptr(wb), n_rows, n, _ptr(xa), _ptr(out, "float *"))
    else:
        rc = lib.ds4_matvec_f32(tid, _ptr(wb), n_rows, n, _ptr(xa, "float *"), _ptr(out, "float *"))
    if rc != 0:
        raise QuantError(f"native matvec failed for {_NAMES[tid]}")  # pragma: no cover
    return out


def simd_level() -> int:
    """Kernel level in use: 0 scalar, 1 AVX2+FMA+F16C."""
    return int(lib.ds4_simd_level())


def simd_level_max() -> int:
    """Best kernel level this CPU supports."""
    return int(lib.ds4_simd_level_max())


def set_simd_level(level: int) -> int:
    """Select the kernel level (clamped to what the CPU has); returns the level set."""
    lib.ds4_set_simd_level(int(level))
    return simd_level()
