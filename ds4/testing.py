"""Synthetic DeepSeek V4 Flash GGUF files in the published layout.

No real weights can be downloaded in CI, so every test and benchmark runs on files
written here. They follow ``shared/spec/gguf-layout.md`` exactly: the real tensor
names, ranks and per-tensor quant types (§3), the real metadata keys with their exact
GGUF value types (§2), and the real tokenizer arrays (§2.3). Only the sizes
(:class:`ModelConfig`) and the weight values (random, from ``seed``) differ.

Public API::

    ModelConfig(...), ModelConfig.flash(), .tiny(), .mid(), config.validate()
    tensor_plan(config, variant="q2", *, routed_types=None, with_exp_probs_b=True)
        -> [PlannedTensor(name, type, ne), ...]          # file order
    write_model(path, config, *, variant="q2", seed=0, sparse=False,
                routed_types=None, with_exp_probs_b=True, alignment=None,
                imatrix=False, progress=None, kv_overrides=None) -> WriteResult
    read_dequantized(path, names=None) -> {name: float32 ndarray in torch order}

Command line: ``python -m ds4.testing out.gguf --preset tiny --variant q2 --seed 0``.

Weight values. Every quantized tensor is generated block by block directly in its
storage format: the quant fields (2-/4-/8-bit codes, IQ2_XXS grid and sign indices,
K-quant 4-/6-bit sub-block scales and mins) are uniformly random bytes, which are all
valid for these formats, and only the f16 super-scales are set, per block, to
``d0 * U(0.5, 1.5)`` with ``d0`` chosen analytically so that the dequantized values
have the target standard deviation (Q8_0 codes are clamped to [-127, 127] as a real
quantizer leaves them). K-quant ``dmin`` fields get an independent random factor and a
fixed ratio to ``d`` that makes the expected value zero. Dense matrices target
``std = 1/sqrt(fan_in)`` (fan_in = ne0), so every projection maps unit-RMS inputs to
unit-RMS outputs; the embedding has std 1. Norm weights are ``1 + N(0, 0.05)``.
Tensors that transformers initialises to zero or one (attention sinks, HC base and
scale, ``exp_probs_b``, compressor APE) are random and non-zero on purpose.
Everything is deterministic from ``seed``: each tensor is drawn from its own
generator seeded by (seed, crc32(tensor name)), in fixed chunks (one expert, or a
fixed group of rows), so q2 and q4 files of one seed share every non-expert tensor.
"""
from __future__ import annotations

import argparse
import functools
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

QT = GGMLQuantizationType
VT = GGUFValueType

ARCH = "deepseek4"
REAL_VOCAB_SIZE = 129280        # tokens in the real V4 tokenizer (gguf-layout §2.3)
DEFAULT_ALIGNMENT = 32          # gguf-layout §1: used when general.alignment is absent
_U64 = struct.Struct("<Q")

ROUTED_TYPES = (QT.IQ2_XXS, QT.Q2_K, QT.Q4_K)
VARIANT_ROUTED = {               # (gate, up, down), gguf-layout §3.1
    "q2": (QT.IQ2_XXS, QT.IQ2_XXS, QT.Q2_K),
    "q4": (QT.Q4_K, QT.Q4_K, QT.Q4_K),
}
# llama.cpp LlamaFileType values. The published files' general.file_type is not
# known from our sources (gguf-layout §2.4); these are the natural choices.
VARIANT_FILE_TYPE = {"q2": 19, "q4": 15}   # MOSTLY_IQ2_XXS, MOSTLY_Q4_K_M


def flash_compress_ratios(n_layer: int) -> tuple[int, ...]:
    """The V4 Flash rule (gguf-layout §5.1): layers 0, 1 -> 0; then even -> 4, odd -> 128."""
    return tuple(0 if il < 2 else (4 if il % 2 == 0 else 128) for il in range(n_layer))


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ModelConfig:
    """Every shape parameter of a DeepSeek V4 GGUF; the defaults are V4 Flash."""
    n_layer: int = 43
    n_embd: int = 4096
    vocab_size: int = REAL_VOCAB_SIZE
    n_head: int = 64
    n_head_kv: int = 1
    head_dim: int = 512
    rope_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    n_expert: int = 256
    n_expert_used: int = 6
    expert_ff: int = 2048
    n_shared: int = 1
    n_hash_layers: int = 3
    sliding_window: int = 128
    indexer_heads: int = 64
    indexer_dim: int = 128
    indexer_top_k: int = 512
    hc: int = 4
    sinkhorn_iters: int = 20
    # Per layer, length n_layer. None = the Flash rule. A list of n_layer + 1 entries
    # ending in 0 (config.json style, with the MTP layer) is accepted and trimmed.
    compress_ratios: tuple[int, ...] | None = None
    swiglu_clamp: float = 10.0
    rope_base: float = 10000.0
    compress_rope_base: float = 160000.0
    yarn_factor: float = 16.0
    original_ctx: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    expert_weights_scale: float = 1.5
    rms_eps: float = 1e-6
    hc_eps: float = 1e-6
    context_length: int = 1048576
    name: str = "DeepSeek V4 Flash"

    def __post_init__(self):
        cr = self.compress_ratios
        if cr is None:
            cr = flash_compress_ratios(self.n_layer)
        cr = tuple(int(r) for r in cr)
        if len(cr) == self.n_layer + 1 and cr[-1] == 0:
            cr = cr[:-1]
        object.__setattr__(self, "compress_ratios", cr)

    # presets ------------------------------------------------------------------
    @classmethod
    def flash(cls, **overrides) -> "ModelConfig":
        """The published DeepSeek V4 Flash shape (284B parameters)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """6 layers, every layer kind: SWA+hash (0, 1), CSA+hash (2), HCA+top-k (3, 5),
        CSA+top-k (4). Ratios [0,0,4,8,4,8] so compression fires in short prompts.
        About 105 MB, almost all of it the (real-vocabulary) embedding and LM head."""
        kw = dict(n_layer=6, n_embd=256, n_head=4, head_dim=64, rope_dim=16,
                  q_lora_rank=128, o_lora_rank=64, o_groups=2, n_expert=8,
                  n_expert_used=2, expert_ff=256, n_shared=1, n_hash_layers=3,
                  sliding_window=8, indexer_heads=8, indexer_dim=32, indexer_top_k=4,
                  compress_ratios=(0, 0, 4, 8, 4, 8),
                  name="DeepSeek V4 Flash (synthetic tiny)")
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def mid(cls, **overrides) -> "ModelConfig":
        """All 43 layers with the Flash schedule at reduced width (about 0.5 GB q2):
        for depth/stability checks and benchmarks."""
        kw = dict(n_layer=43, n_embd=512, n_head=8, head_dim=128, rope_dim=64,
                  q_lora_rank=256, o_lora_rank=128, o_groups=4, n_expert=32,
                  n_expert_used=4, expert_ff=512, n_shared=1, n_hash_layers=3,
                  sliding_window=32, indexer_heads=8, indexer_dim=64, indexer_top_k=16,
                  name="DeepSeek V4 Flash (synthetic mid)")
        kw.update(overrides)
        return cls(**kw)

    PRESETS = ("tiny", "mid", "flash")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, name)(**overrides)

    # derived shapes -------------------------------------------------------------
    def ratio(self, il: int) -> int:
        return self.compress_ratios[il]

    def coff(self, il: int) -> int:
        """Compressor series per token: 2 on ratio-4 (overlapping CSA) layers, else 1."""
        return 2 if self.compress_ratios[il] == 4 else 1

    def is_hash_layer(self, il: int) -> bool:
        return il < self.n_hash_layers

    @property
    def heads_per_group(self) -> int:
        return self.n_head // self.o_groups

    @property
    def o_group_in(self) -> int:
        """ne0 of attn_output_a: the concatenated head outputs of one group."""
        return self.heads_per_group * self.head_dim

    @property
    def shared_ff(self) -> int:
        return self.expert_ff * self.n_shared

    @property
    def hc_mix(self) -> int:
        """HC control outputs per site: hc pre + hc post + hc*hc comb (24 for hc=4)."""
        return (2 + self.hc) * self.hc

    def is_flash(self) -> bool:
        return self == ModelConfig.flash()

    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the first impossible or unsupported value."""
        def fail(msg):
            raise ValueError(f"invalid ModelConfig: {msg}")

        ints = ("n_layer", "n_embd", "vocab_size", "n_head", "n_head_kv", "head_dim",
                "rope_dim", "q_lora_rank", "o_lora_rank", "o_groups", "n_expert",
                "n_expert_used", "expert_ff", "n_shared", "sliding_window",
                "indexer_heads", "indexer_dim", "indexer_top_k", "hc", "sinkhorn_iters",
                "original_ctx", "context_length")
        for f in ints:
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                fail(f"{f} must be a positive integer, got {v!r}")
        if not isinstance(self.n_hash_layers, int) or not 0 <= self.n_hash_layers <= self.n_layer:
            fail(f"n_hash_layers must be in 0..n_layer={self.n_layer}, got {self.n_hash_layers!r}")
        if self.vocab_size != REAL_VOCAB_SIZE:
            fail(f"vocab_size must be {REAL_VOCAB_SIZE} (the real tokenizer's size), "
                 f"got {self.vocab_size}")
        if self.n_head_kv != 1:
            fail(f"n_head_kv must be 1 (one shared K=V head), got {self.n_head_kv}")
        if self.rope_dim % 2:
            fail(f"rope_dim must be even (interleaved pairs), got {self.rope_dim}")
        if self.rope_dim > self.head_dim:
            fail(f"rope_dim={self.rope_dim} exceeds head_dim={self.head_dim}")
        if self.rope_dim > self.indexer_dim:
            fail(f"rope_dim={self.rope_dim} exceeds indexer_dim={self.indexer_dim}")
        if self.n_head % self.o_groups:
            fail(f"n_head={self.n_head} is not divisible by o_groups={self.o_groups}")
        if self.n_expert_used > self.n_expert:
            fail(f"n_expert_used={self.n_expert_used} exceeds n_expert={self.n_expert}")
        if len(self.compress_ratios) != self.n_layer:
            fail(f"compress_ratios has {len(self.compress_ratios)} entries, "
                 f"expected n_layer={self.n_layer}")
        for il, r in enumerate(self.compress_ratios):
            if r < 0 or r == 1:
                fail(f"compress ratio at layer {il} must be 0 or >= 2, got {r}")
        for f in ("swiglu_clamp", "rope_base", "compress_rope_base", "yarn_factor",
                  "expert_weights_scale"):
            if not float(getattr(self, f)) > 0:
                fail(f"{f} must be positive, got {getattr(self, f)!r}")
        for f in ("rms_eps", "hc_eps"):
            if not float(getattr(self, f)) >= 0:
                fail(f"{f} must be >= 0, got {getattr(self, f)!r}")
        # Quant block multiples along ne0 (gguf-layout §3.9 / §4).
        k_rows = {"n_embd (ne0 of routed gate/up experts)": self.n_embd,
                  "expert_ff (ne0 of routed down experts)": self.expert_ff}
        for what, ne0 in k_rows.items():
            if ne0 % 256:
                fail(f"{what}={ne0} must be a multiple of 256 (K/IQ quant blocks)")
        q8_rows = {"n_embd (ne0 of attn_q_a, attn_kv, shexp gate/up, output)": self.n_embd,
                   "q_lora_rank (ne0 of attn_q_b)": self.q_lora_rank,
                   "n_head/o_groups*head_dim (ne0 of attn_output_a)": self.o_group_in,
                   "o_groups*o_lora_rank (ne0 of attn_output_b)": self.o_groups * self.o_lora_rank,
                   "expert_ff*n_shared (ne0 of ffn_down_shexp)": self.shared_ff}
        for what, ne0 in q8_rows.items():
            if ne0 % 32:
                fail(f"{what}={ne0} must be a multiple of 32 (Q8_0 blocks)")
        return self


# --------------------------------------------------------------------------- plan

class PlannedTensor(NamedTuple):
    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]          # GGUF order, ne0 first

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.type]
        return self.n_elements // bs * ts

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


def _qtype(t) -> GGMLQuantizationType:
    if isinstance(t, str):
        try:
            return QT[t.upper()]
        except KeyError:
            raise ValueError(f"unknown GGML type name {t!r}") from None
    return QT(int(t))


def _routed_per_layer(config: ModelConfig, variant: str, routed_types) -> list[tuple]:
    if variant not in VARIANT_ROUTED:
        raise ValueError(f"variant must be 'q2' or 'q4', got {variant!r}")
    per = [VARIANT_ROUTED[variant]] * config.n_layer
    if routed_types is None:
        return per
    if isinstance(routed_types, dict):
        items = routed_types.items()
    else:
        if len(routed_types) != config.n_layer:
            raise ValueError(f"routed_types has {len(routed_types)} entries, "
                             f"expected n_layer={config.n_layer}")
        items = enumerate(routed_types)
    for il, entry in items:
        if not 0 <= il < config.n_layer:
            raise ValueError(f"routed_types: layer {il} out of range")
        if entry is None:
            continue
        if isinstance(entry, str) and entry in VARIANT_ROUTED:
            per[il] = VARIANT_ROUTED[entry]
            continue
        if isinstance(entry, str) or len(entry) != 3:
            raise ValueError(f"routed_types[{il}] must be 'q2', 'q4' or a (gate, up, down) "
                             f"type triple, got {entry!r}")
        triple = tuple(_qtype(t) for t in entry)
        for t in triple:
            if t not in ROUTED_TYPES:
                raise ValueError(f"routed_types[{il}]: {t.name} is not a routed-expert type "
                                 f"(IQ2_XXS, Q2_K or Q4_K)")
        per[il] = triple
    return per


def tensor_plan(config: ModelConfig | None = None, variant: str = "q2", *,
                routed_types=None, with_exp_probs_b: bool = True) -> list[PlannedTensor]:
    """Every tensor of the main GGUF, in file order, as (name, ggml type, ne).

    The order: token_embd, then blk.0 .. blk.{n-1} (each in ds4's binding order),
    then the output HC head, output_norm and output. The published files' exact
    directory order is not known from our sources; loaders must not depend on it.
    """
    c = (config or ModelConfig.flash()).validate()
    routed = _routed_per_layer(c, variant, routed_types)
    D, hcD = c.n_embd, c.hc * c.n_embd
    plan: list[PlannedTensor] = []

    def add(name, qtype, *ne):
        plan.append(PlannedTensor(name, qtype, tuple(int(x) for x in ne)))

    add("token_embd.weight", QT.F16, D, c.vocab_size)
    for il in range(c.n_layer):
        p = f"blk.{il}."
        r = c.ratio(il)
        add(p + "hc_attn_fn.weight", QT.F16, hcD, c.hc_mix)
        add(p + "hc_attn_scale.weight", QT.F32, 3)
        add(p + "hc_attn_base.weight", QT.F32, c.hc_mix)
        add(p + "attn_norm.weight", QT.F32, D)
        add(p + "attn_q_a.weight", QT.Q8_0, D, c.q_lora_rank)
        add(p + "attn_q_a_norm.weight", QT.F32, c.q_lora_rank)
        add(p + "attn_q_b.weight", QT.Q8_0, c.q_lora_rank, c.n_head * c.head_dim)
        add(p + "attn_kv.weight", QT.Q8_0, D, c.head_dim)
        add(p + "attn_kv_a_norm.weight", QT.F32, c.head_dim)
        add(p + "attn_sinks.weight", QT.F32, c.n_head)
        add(p + "attn_output_a.weight", QT.Q8_0, c.o_group_in, c.o_groups * c.o_lora_rank)
        add(p + "attn_output_b.weight", QT.Q8_0, c.o_groups * c.o_lora_rank, D)
        if r != 0:
            width = c.coff(il) * c.head_dim
            add(p + "attn_compressor_ape.weight", QT.F16, width, r)
            add(p + "attn_compressor_kv.weight", QT.F16, D, width)
            add(p + "attn_compressor_gate.weight", QT.F16, D, width)
            add(p + "attn_compressor_norm.weight", QT.F32, c.head_dim)
        if r == 4:
            iwidth = c.coff(il) * c.indexer_dim
            add(p + "indexer.attn_q_b.weight", QT.F16, c.q_lora_rank,
                c.indexer_heads * c.indexer_dim)
            add(p + "indexer.proj.weight", QT.F16, D, c.indexer_heads)
            add(p + "indexer_compressor_ape.weight", QT.F16, iwidth, r)
            add(p + "indexer_compressor_kv.weight", QT.F16, D, iwidth)
            add(p + "indexer_compressor_gate.weight", QT.F16, D, iwidth)
            add(p + "indexer_compressor_norm.weight", QT.F32, c.indexer_dim)
        add(p + "hc_ffn_fn.weight", QT.F16, hcD, c.hc_mix)
        add(p + "hc_ffn_scale.weight", QT.F32, 3)
        add(p + "hc_ffn_base.weight", QT.F32, c.hc_mix)
        add(p + "ffn_norm.weight", QT.F32, D)
        add(p + "ffn_gate_inp.weight", QT.F16, D, c.n_expert)
        if with_exp_probs_b and not c.is_hash_layer(il):
            add(p + "exp_probs_b.bias", QT.F32, c.n_expert)
        tg, tu, td = routed[il]
        add(p + "ffn_gate_exps.weight", tg, D, c.expert_ff, c.n_expert)
        add(p + "ffn_up_exps.weight", tu, D, c.expert_ff, c.n_expert)
        add(p + "ffn_down_exps.weight", td, c.expert_ff, D, c.n_expert)
        add(p + "ffn_gate_shexp.weight", QT.Q8_0, D, c.shared_ff)
        add(p + "ffn_up_shexp.weight", QT.Q8_0, D, c.shared_ff)
        add(p + "ffn_down_shexp.weight", QT.Q8_0, c.shared_ff, D)
        if c.is_hash_layer(il):
            add(p + "ffn_gate_tid2eid.weight", QT.I32, c.n_expert_used, c.vocab_size)
    add("output_hc_base.weight", QT.F32, c.hc)
    add("output_hc_fn.weight", QT.F16, hcD, c.hc)
    add("output_hc_scale.weight", QT.F32, 1)
    add("output_norm.weight", QT.F32, D)
    add("output.weight", QT.Q8_0, D, c.vocab_size)
    return plan


# --------------------------------------------------------------------------- metadata

@functools.lru_cache(maxsize=1)
def _vocab():
    from .tokenizer import gguf_vocab_from_tokenizer_json
    tokens, merges, types = gguf_vocab_from_tokenizer_json()
    return tuple(tokens), tuple(merges), tuple(int(t) for t in types)


IMATRIX_DEFAULTS = {
    "file": "imatrix-DeepSeek-V4-Flash-synthetic.dat",
    "dataset": "ds4-synthetic-calibration.txt",
    "chunks_count": 256,
}


def metadata_plan(config: ModelConfig, variant: str = "q2", *, imatrix=False,
                  alignment: int | None = None) -> list[tuple]:
    """The KV records in file order: (key, value, GGUFValueType, array sub-type or None).

    general.architecture comes first (GGUFWriter adds it). The keys and value types
    follow gguf-layout §2.1–2.5; unknown-provenance display keys (§2.4) are included
    so that loaders are exercised on them.
    """
    c = config
    P = ARCH + "."
    tokens, merges, token_types = _vocab()
    kv = [
        ("general.name", c.name, VT.STRING, None),
        ("general.license", "mit", VT.STRING, None),
    ]
    if alignment is not None:
        kv.append(("general.alignment", int(alignment), VT.UINT32, None))
    u32 = lambda k, v: kv.append((P + k, int(v), VT.UINT32, None))   # noqa: E731
    f32 = lambda k, v: kv.append((P + k, float(v), VT.FLOAT32, None))  # noqa: E731
    u32("block_count", c.n_layer)
    kv.append((P + "context_length", int(c.context_length), VT.UINT64, None))
    u32("embedding_length", c.n_embd)
    u32("vocab_size", c.vocab_size)
    u32("attention.head_count", c.n_head)
    u32("attention.head_count_kv", c.n_head_kv)
    u32("attention.key_length", c.head_dim)
    u32("attention.value_length", c.head_dim)
    u32("rope.dimension_count", c.rope_dim)
    f32("rope.freq_base", c.rope_base)
    kv.append((P + "rope.scaling.type", "yarn", VT.STRING, None))
    f32("rope.scaling.factor", c.yarn_factor)
    u32("rope.scaling.original_context_length", c.original_ctx)
    f32("rope.scaling.yarn_beta_fast", c.yarn_beta_fast)
    f32("rope.scaling.yarn_beta_slow", c.yarn_beta_slow)
    f32("attention.layer_norm_rms_epsilon", c.rms_eps)
    u32("attention.q_lora_rank", c.q_lora_rank)
    u32("attention.output_lora_rank", c.o_lora_rank)
    u32("attention.output_group_count", c.o_groups)
    u32("attention.sliding_window", c.sliding_window)
    kv.append((P + "attention.compress_ratios", list(c.compress_ratios) + [0],
               VT.ARRAY, VT.INT32))
    f32("attention.compress_rope_freq_base", c.compress_rope_base)
    u32("attention.indexer.head_count", c.indexer_heads)
    u32("attention.indexer.key_length", c.indexer_dim)
    u32("attention.indexer.top_k", c.indexer_top_k)
    u32("expert_count", c.n_expert)
    u32("expert_used_count", c.n_expert_used)
    u32("expert_shared_count", c.n_shared)
    u32("expert_feed_forward_length", c.expert_ff)
    f32("expert_weights_scale", c.expert_weights_scale)
    kv.append((P + "expert_weights_norm", True, VT.BOOL, None))
    u32("expert_gating_func", 4)
    u32("hash_layer_count", c.n_hash_layers)
    kv.append((P + "swiglu_clamp_exp", [float(c.swiglu_clamp)] * c.n_layer,
               VT.ARRAY, VT.FLOAT32))
    u32("hyper_connection.count", c.hc)
    u32("hyper_connection.sinkhorn_iterations", c.sinkhorn_iters)
    f32("hyper_connection.epsilon", c.hc_eps)
    u32("nextn_predict_layers", 1)
    kv += [
        ("general.quantization_version", 2, VT.UINT32, None),
        ("general.file_type", VARIANT_FILE_TYPE[variant], VT.UINT32, None),
        ("tokenizer.ggml.model", "gpt2", VT.STRING, None),
        ("tokenizer.ggml.pre", "joyai-llm", VT.STRING, None),
        ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
        ("tokenizer.ggml.token_type", token_types, VT.ARRAY, VT.INT32),
        ("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING),
        ("tokenizer.ggml.bos_token_id", 0, VT.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 1, VT.UINT32, None),
        ("tokenizer.ggml.padding_token_id", 1, VT.UINT32, None),
        ("tokenizer.ggml.add_bos_token", False, VT.BOOL, None),
        ("tokenizer.ggml.add_eos_token", False, VT.BOOL, None),
    ]
    if imatrix:
        im = dict(IMATRIX_DEFAULTS)
        if isinstance(imatrix, dict):
            im.update(imatrix)
        kv.append(("quantize.imatrix.file", str(im["file"]), VT.STRING, None))
        kv.append(("quantize.imatrix.entries_count", 3 * c.n_layer, VT.UINT64, None))
        if im.get("dataset"):
            kv.append(("quantize.imatrix.dataset", str(im["dataset"]), VT.STRING, None))
        if im.get("chunks_count"):
            kv.append(("quantize.imatrix.chunks_count", int(im["chunks_count"]),
                       VT.UINT64, None))
    return kv


# --------------------------------------------------------------------------- values

def init_kind(name: str) -> tuple[str, float]:
    """How a tensor's values are drawn: (kind, parameter).

    kinds: "linear" (std 1/sqrt(ne0)), "std" (given std), "norm" (1 + N(0, p)),
    "normal" (N(0, p)), "uniform_pos" (U(p, 3p)), "tid2eid".
    """
    if name.endswith("tid2eid.weight"):
        return "tid2eid", 0.0
    if name == "token_embd.weight":
        return "std", 1.0
    if name.endswith("norm.weight"):
        return "norm", 0.05
    if name.endswith("attn_sinks.weight"):
        return "normal", 1.0
    if name.endswith("_base.weight"):          # hc_attn/ffn_base, output_hc_base
        return "normal", 0.5
    if name.endswith("_scale.weight"):         # hc_attn/ffn_scale, output_hc_scale
        return "uniform_pos", 0.5              # U(0.5, 1.5)
    if name.endswith("exp_probs_b.bias"):
        return "normal", 0.1
    if name.endswith("_ape.weight"):           # compressor position biases
        return "std", 0.5
    return "linear", 0.0


def _moments_uniform_int(lo, hi):
    v = np.arange(lo, hi + 1, dtype=np.float64)
    return v.mean(), (v * v).mean()


@functools.lru_cache(maxsize=None)
def _unit_std(qtype: GGMLQuantizationType) -> float:
    """Std of the dequantized values of a block generated with base scale d0 = 1.

    Per-block factor f ~ U(0.5, 1.5): E f = 1, E f^2 = 13/12. Exact expectations.
    """
    Ef2 = 13.0 / 12.0
    if qtype == QT.Q8_0:
        v = np.arange(-128, 128, dtype=np.float64)
        v[0] = -127.0                       # clamped
        Eq, Eq2 = v.mean(), (v * v).mean()
        return float(np.sqrt(Ef2 * Eq2 - Eq * Eq))
    if qtype in (QT.Q2_K, QT.Q4_K):
        smax, qmax = (15, 3) if qtype == QT.Q2_K else (63, 15)
        Es, Es2 = _moments_uniform_int(0, smax)   # sub-block scale and min alike
        Eq, Eq2 = _moments_uniform_int(0, qmax)
        r = _dmin_ratio(qtype)
        # v = f*sc*q - r*g*m with f, g, sc, m, q independent; E v = 0 by choice of r
        Ev2 = Ef2 * Es2 * Eq2 - 2 * r * Es * Eq * Es + r * r * Ef2 * Es2
        return float(np.sqrt(Ev2))
    if qtype == QT.IQ2_XXS:
        gguf.quants.IQ2_XXS.init_grid()
        G = np.asarray(gguf.quants.IQ2_XXS.grid, dtype=np.float64)
        EG2 = float((G * G).mean())
        _, El2 = _moments_uniform_int(0, 15)
        El = 7.5
        Edb2 = (El2 + El + 0.25) / 16.0     # E[((0.5 + ls) / 4)^2]
        return float(np.sqrt(Ef2 * Edb2 * EG2))
    raise ValueError(f"no block generator for {qtype.name}")


def _dmin_ratio(qtype) -> float:
    """dmin/d making E[d*sc*q - dmin*m] = 0 for uniform sc, m, q: E q."""
    return 1.5 if qtype == QT.Q2_K else 7.5


_D_OFFSETS = {  # byte offsets of the f16 (d, dmin) fields inside a block
    QT.Q8_0: (0, None),
    QT.Q2_K: (80, 82),
    QT.Q4_K: (0, 2),
    QT.IQ2_XXS: (0, None),
}


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = rng.bit_generator.random_raw((n + 7) // 8)
    return raw.view(np.uint8)[:n]


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def gen_quant_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType,
                     n_elements: int, std: float) -> np.ndarray:
    """Random valid blocks of `qtype` (uint8, n_elements/block * type_size bytes)
    whose dequantized values have standard deviation `std`."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    nb = n_elements // bs
    raw = _random_bytes(rng, nb * ts)
    if qtype == QT.Q8_0:   # codes in [-127, 127] as ggml leaves them (d is overwritten below)
        q = raw.view(np.int8)
        np.maximum(q, -127, out=q)
    blocks = raw.reshape(nb, ts)
    d0 = std / _unit_std(qtype)
    od, om = _D_OFFSETS[qtype]
    f = rng.random(nb, dtype=np.float32) + np.float32(0.5)
    blocks[:, od:od + 2] = _f16_bytes(f * np.float32(d0))
    if om is not None:
        g = rng.random(nb, dtype=np.float32) + np.float32(0.5)
        blocks[:, om:om + 2] = _f16_bytes(g * np.float32(d0 * _dmin_ratio(qtype)))
    return raw


def gen_float(rng, qtype, n, kind, p, fan_in=None) -> np.ndarray:
    if kind == "linear":
        kind, p = "std", 1.0 / np.sqrt(fan_in)
    if kind == "std":               # uniform with that std: fast, bounded
        a = np.float32(p * np.sqrt(3.0))
        x = rng.random(n, dtype=np.float32)
        x *= 2 * a
        x -= a
    elif kind == "norm":
        x = (1.0 + p * rng.standard_normal(n)).astype(np.float32)
    elif kind == "normal":
        x = (p * rng.standard_normal(n)).astype(np.float32)
    elif kind == "uniform_pos":
        x = (p + 2 * p * rng.random(n)).astype(np.float32)
    else:
        raise ValueError(kind)
    dt = np.float16 if qtype == QT.F16 else np.float32
    return x.astype(dt, copy=False).view(np.uint8)


def gen_tid2eid(rng, n_rows: int, k: int, n_expert: int) -> np.ndarray:
    """n_rows x k expert ids in [0, n_expert), distinct within each row (int32)."""
    if n_expert <= 64 or k * k > n_expert:
        keys = rng.random((n_rows, n_expert), dtype=np.float32)
        return np.argsort(keys, axis=1)[:, :k].astype(np.int32)
    out = rng.integers(0, n_expert, size=(n_rows, k), dtype=np.int32)
    while True:
        s = np.sort(out, axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
        nbad = int(bad.sum())
        if nbad == 0:
            return out
        out[bad] = rng.integers(0, n_expert, size=(nbad, k), dtype=np.int32)


CHUNK_BYTES = 8 << 20   # target chunk size for 2-D tensors (rows are never split)


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one tensor: depends only on (seed, tensor name), so a tensor's
    bytes do not depend on the other tensors; e.g. q2 and q4 files of one seed share
    every non-expert tensor byte for byte, as the published files do."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])
    return np.random.Generator(np.random.SFC64(ss))


def tensor_chunks(t: PlannedTensor, config: ModelConfig, seed: int = 0) -> Iterator[np.ndarray]:
    """The tensor's bytes as a sequence of uint8 arrays: one expert, or a fixed group
    of whole rows (about CHUNK_BYTES), per chunk, drawn in order from tensor_rng."""
    kind, p = init_kind(t.name)
    bs, ts = GGML_QUANT_SIZES[t.type]
    ne0 = t.ne[0]
    row_bytes = ne0 // bs * ts
    n_rows = t.n_elements // ne0
    if len(t.ne) == 3:
        rows_per_chunk = t.ne[1]                    # one expert
    else:
        rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    rng = tensor_rng(seed, t.name)
    for r0 in range(0, n_rows, rows_per_chunk):
        nr = min(rows_per_chunk, n_rows - r0)
        n = nr * ne0
        if kind == "tid2eid":
            yield gen_tid2eid(rng, nr, ne0, config.n_expert).view(np.uint8).reshape(-1)
        elif t.type in (QT.F16, QT.F32):
            yield gen_float(rng, t.type, n, kind, p, fan_in=ne0)
        else:
            std = 1.0 / np.sqrt(ne0) if kind == "linear" else p
            yield gen_quant_blocks(rng, t.type, n, std)


# --------------------------------------------------------------------------- writer

@dataclass
class WriteResult:
    path: str
    n_tensors: int
    n_kv: int
    header_bytes: int        # end of the tensor infos (unpadded)
    data_offset: int         # start of the data section (header padded to alignment)
    data_bytes: int          # tensor data including per-tensor padding
    file_bytes: int
    seconds: float
    sparse: bool

    @property
    def mb_per_s(self) -> float:
        return self.file_bytes / 1e6 / max(self.seconds, 1e-9)


class _Writer(gguf.GGUFWriter):
    """GGUFWriter with array values packed in one numpy/bytes pass (and cached),
    instead of one recursive _pack_val call per element. Same bytes."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if (vtype == VT.ARRAY and sub_type is not None and len(val) > 0
                and self.endianess == gguf.GGUFEndian.LITTLE
                and (sub_type == VT.STRING or sub_type in _NP_SCALAR)):
            body = _pack_array(sub_type, tuple(val))
            head = struct.pack("<IQ", sub_type, len(val))
            return (struct.pack("<I", vtype) if add_vtype else b"") + head + body
        return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)


_NP_SCALAR = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2",
              VT.UINT32: "<u4", VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.UINT64: "<u8",
              VT.INT64: "<i8", VT.FLOAT64: "<f8", VT.BOOL: "<u1"}


@functools.lru_cache(maxsize=16)
def _pack_array(sub_type, val: tuple) -> bytes:
    if sub_type == VT.STRING:
        enc = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
        pack = _U64.pack
        return b"".join([pack(len(e)) + e for e in enc])
    return np.asarray(val, dtype=_NP_SCALAR[sub_type]).tobytes()


def _pad(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _write_data(f, plan, config, seed, align, data_bytes, lead_pad, progress):
    """Generate and write every payload in order. A single writer thread overlaps
    the disk writes with generation (numpy and write() both release the GIL)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds4-gguf-write") as ex:
        def put(buf):
            pending.append(ex.submit(f.write, buf))
            while len(pending) > 3:
                pending.popleft().result()

        put(bytes(lead_pad))
        done = 0
        for t in plan:
            written = 0
            for chunk in tensor_chunks(t, config, seed):
                put(memoryview(chunk))
                written += chunk.nbytes
                if progress:
                    progress(done + written, data_bytes, t.name)
            if written != t.nbytes:
                raise AssertionError(f"{t.name}: generated {written} bytes, "
                                     f"expected {t.nbytes}")
            pad = _pad(written, align) - written
            if pad:
                put(bytes(pad))
            done += written + pad
        while pending:
            pending.popleft().result()
    f.flush()


def write_model(path, config: ModelConfig | None = None, *, variant: str = "q2",
                seed: int = 0, sparse: bool = False, routed_types=None,
                with_exp_probs_b: bool = True, alignment: int | None = None,
                imatrix=False, progress: Callable[[int, int, str], None] | None = None,
                kv_overrides: dict | None = None) -> WriteResult:
    """Write a synthetic DeepSeek V4 GGUF, streaming tensor by tensor.

    variant: "q2" (IQ2_XXS/IQ2_XXS/Q2_K experts) or "q4" (Q4_K experts).
    routed_types: per-layer override of the routed (gate, up, down) types for mixed
        files: a list of n_layer entries or a {layer: entry} dict, each entry None,
        "q2", "q4" or a triple of type names/ids.
    sparse: write the header, then only extend the file so the data section is a
        hole (reads as zeros; uses almost no disk). For layout checks of full-size files.
    alignment: None writes no general.alignment key (readers then use 32); an int
        writes it as u32 and pads with it.
    imatrix: True (or a dict overriding IMATRIX_DEFAULTS) appends the
        quantize.imatrix.* KVs, as the *-imatrix files carry.
    progress: called as progress(done_bytes, total_data_bytes, tensor_name).
    kv_overrides: {key: None (drop) | (value, GGUFValueType[, sub_type])}, applied
        after the standard KVs (new keys go last); for malformed-file tests.
    """
    t_start = time.perf_counter()
    config = (config or ModelConfig.flash()).validate()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    plan = tensor_plan(config, variant, routed_types=routed_types,
                       with_exp_probs_b=with_exp_probs_b)
    tokens = _vocab()[0]
    if len(tokens) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but vocab_size="
                         f"{config.vocab_size}")

    path = os.fspath(path)
    w = _Writer(path, ARCH)
    align = DEFAULT_ALIGNMENT
    if alignment is not None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        w.data_alignment = align = int(alignment)
    for key, val, vt, sub in metadata_plan(config, variant, imatrix=imatrix,
                                           alignment=alignment):
        w.add_key_value(key, val, vt, sub_type=sub)
    for key, spec in (kv_overrides or {}).items():
        if spec is None:
            w.kv_data[0].pop(key, None)
        else:
            w.kv_data[0].pop(key, None)
            w.add_key_value(key, spec[0], spec[1],
                            sub_type=spec[2] if len(spec) > 2 else None)
    for t in plan:
        w.add_tensor_info(t.name, t.torch_shape, np.dtype(np.float32), t.nbytes,
                          raw_dtype=t.type)
    n_kv = len(w.kv_data[0])
    data_bytes = sum(_pad(t.nbytes, align) for t in plan)
    ok = False
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        f.flush()
        header_bytes = f.tell()
        data_offset = _pad(header_bytes, align)
        file_bytes = data_offset + data_bytes
        if sparse:
            f.truncate(file_bytes)
            if progress:
                progress(data_bytes, data_bytes, plan[-1].name)
        else:
            _write_data(f, plan, config, seed, align, data_bytes,
                        data_offset - header_bytes, progress)
            if f.tell() != file_bytes:
                raise AssertionError(f"file is {f.tell()} bytes, expected {file_bytes}")
        ok = True
    finally:
        w.close()
        if not ok and os.path.exists(path):
            os.remove(path)     # never leave a truncated model behind
    return WriteResult(path=path, n_tensors=len(plan), n_kv=n_kv,
                       header_bytes=header_bytes, data_offset=data_offset,
                       data_bytes=data_bytes, file_bytes=file_bytes,
                       seconds=time.perf_counter() - t_start, sparse=bool(sparse))


# --------------------------------------------------------------------------- reader

class FastGGUFReader(gguf.GGUFReader):
    """gguf.GGUFReader, parsing the same fields, parts and tensors, faster.

    The stock reader slices its np.memmap once per array element, which takes
    15-20 s on the ~390,000 tokenizer entries of a real-vocabulary header here.
    This subclass slices a plain ndarray view of the same mapping and walks the
    string-array length prefixes with struct; the resulting ReaderField parts,
    data indices and types are identical (checked in tests/test_testing.py).
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        arr = plain[offset:offset + itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(
            self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        if (GGUFValueType(raw_type) != VT.ARRAY or self.byte_order != "I"
                or sys.byteorder != "little"):
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        n = int(alen[0])
        itype = int(raw_itype[0])
        offs = orig_offs + 12
        if n == 0 or itype not in (VT.STRING, *self.gguf_scalar_to_np):
            return super()._get_field_parts(orig_offs, raw_type)
        itype = VT(itype)
        parts: list = [raw_itype, alen]
        if itype == VT.STRING:
            plain = self._plain
            mv = memoryview(plain)
            unpack = _U64.unpack_from
            o = offs
            for _ in range(n):
                (ln,) = unpack(mv, o)
                parts.append(plain[o:o + 8].view(np.uint64))
                parts.append(plain[o + 8:o + 8 + ln])
                o += 8 + ln
            return o - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), [VT.ARRAY, VT.STRING]
        arr = self._get(offs, self.gguf_scalar_to_np[itype], n)
        parts.extend(arr.reshape(n, 1))
        return 12 + int(arr.nbytes), parts, list(range(2, 2 + n)), [VT.ARRAY, itype]


def read_dequantized(path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Every tensor (or those in `names`) dequantized with gguf-py, in torch order.

    The independent reference path: gguf.GGUFReader + gguf.quants.dequantize. Values
    are float32, except I32 tensors (the tid2eid tables), returned as int32.
    """
    reader = FastGGUFReader(os.fspath(path), "r")
    want = None if names is None else set(names)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if want is not None and t.name not in want:
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type == QT.I32:
            arr = np.array(t.data, dtype=np.int32).reshape(shape)
        else:
            arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        out[t.name] = arr
    if want is not None and want - out.keys():
        raise KeyError(f"tensors not in {path}: {sorted(want - out.keys())}")
    return out


# --------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds4.testing",
                                 description="Write a synthetic DeepSeek V4 Flash GGUF.")
    ap.add_argument("path")
    ap.add_argument("--preset", choices=ModelConfig.PRESETS, default="tiny")
    ap.add_argument("--variant", choices=sorted(VARIANT_ROUTED), default="q2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparse", action="store_true",
                    help="leave the data section a hole (layout checks of full-size files)")
    ap.add_argument("--alignment", type=int, default=None)
    ap.add_argument("--imatrix", action="store_true", help="add quantize.imatrix.* KVs")
    ap.add_argument("--no-exp-probs-b", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    cfg = ModelConfig.preset(a.preset)
    last = [0.0]

    def progress(done, total, name):
        now = time.perf_counter()
        if now - last[0] > 1.0 or done == total:
            last[0] = now
            print(f"\r{done / 1e9:8.2f} / {total / 1e9:.2f} GB  {name:<40}",
                  end="", file=sys.stderr, flush=True)

    try:
        res = write_model(a.path, cfg, variant=a.variant, seed=a.seed, sparse=a.sparse,
                          alignment=a.alignment, imatrix=a.imatrix,
                          with_exp_probs_b=not a.no_exp_probs_b,
                          progress=None if a.quiet else progress)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not a.quiet:
        print(file=sys.stderr)
    print(f"{res.path}: {a.preset} {a.variant}, {res.n_tensors} tensors, {res.n_kv} KVs, "
          f"header {res.header_bytes:,} B, data {res.data_bytes:,} B, "
          f"file {res.file_bytes:,} B{' (sparse)' if res.sparse else ''}, {res.seconds:.2f} s"
          + ("" if res.sparse else f", {res.mb_per_s:.0f} MB/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
