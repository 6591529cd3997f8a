"""Whether a CUDA change keeps the logits' bits: the mid model and two models with
Flash's widths run in each numeric mode (a 400-token chunk, then 8 one-token
steps), saved under a tag; two tags compared value for value.

    python csrc/cuda/same_bits.py run new                      # the change
    DS4_CUDA_NO_X=1 python csrc/cuda/same_bits.py run old     # its switch off
    python csrc/cuda/same_bits.py compare new old

The GPU tests hold CUDA to the CPU at 1e-3, but these random-weight models
turn any change of summation order into a different rounding somewhere
(forward-pass.md's pitfalls); a change meant to keep the arithmetic is held
to identical bits instead."""
import os
import sys

import numpy as np

import ds4
from ds4.testing import ModelConfig, write_model

MODELS = {"mid": ModelConfig.mid(),
          "wide": ModelConfig.tiny(n_embd=1024, expert_ff=2048, q_lora_rank=2048, n_head=8, o_groups=4,
                                   o_lora_rank=2048, head_dim=512, indexer_dim=128),
          # Flash's 4096-wide gate / up rows (16-byte aligned: k_expert_dp4a's 16-byte copies) and
          # its 64 RoPE dims (the qat modes' three-product score chains at the end of a d half)
          "flash_width": ModelConfig.tiny(n_embd=4096, expert_ff=2048, q_lora_rank=2048, n_head=8, o_groups=4,
                                          o_lora_rank=2048, head_dim=512, rope_dim=64, indexer_dim=128)}


def run(tag, folder):
    out = {}
    for name, cfg in MODELS.items():
        path = os.path.join(folder, f"same_bits_{name}.gguf")
        if not os.path.exists(path):
            write_model(path, cfg, variant="q2", seed=11)
        m = ds4.load(path, backend="cuda", ctx=1024)
        ids = np.random.default_rng(5).integers(5, cfg.vocab_size - 1, 420)
        for num in ("exact", "qat", "qat-q8"):
            s = m.session(numerics=num)
            out[f"{name}/{num}/chunk"] = s.eval(ids[:400], all_logits=True)
            out[f"{name}/{num}/steps"] = np.stack([s.eval(ids[400 + i:401 + i]) for i in range(8)])
        del m
    np.savez(os.path.join(folder, f"same_bits_{tag}.npz"), **out)
    print(f"saved {tag}: {len(out)} arrays")


def compare(a_tag, b_tag, folder):
    a = np.load(os.path.join(folder, f"same_bits_{a_tag}.npz"))
    b = np.load(os.path.join(folder, f"same_bits_{b_tag}.npz"))
    same = 0
    for k in a.files:
        x, y = a[k], b[k]
        eq = np.array_equal(x, y)
        same += eq
        rel = float(np.abs(x - y).max() / max(float(np.abs(y).max()), 1e-30))
        print(f"{k:24s} {'identical' if eq else 'DIFFER'}  max rel {rel:.2e}")
    print(f"{same} / {len(a.files)} identical")
    return 0 if same == len(a.files) else 1


if __name__ == "__main__":
    folder = os.environ.get("OUT", "/tmp")
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(sys.argv[2], folder)
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3], folder))
    else:
        sys.exit(__doc__)
