"""One decode step under Nsight Compute: the profiled range is that step alone.

    DS4_CUDA_NO_GRAPH=1 ncu --profile-from-start off ... python csrc/cuda/profile_step.py \\
        MODEL [--synthetic] [--prompt N]"""
import argparse
import ctypes

import numpy as np

import ds4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--synthetic", action="store_true")
    a = ap.parse_args()
    m = ds4.load(a.model, backend="cuda", ctx=a.prompt + 16, synthetic=a.synthetic)
    s = m.session()
    ids = np.random.default_rng(0).integers(0, m.config.n_vocab, size=a.prompt + 3)
    s.eval(ids[:a.prompt])
    s.eval(ids[a.prompt:a.prompt + 1])
    s.eval(ids[a.prompt + 1:a.prompt + 2])
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    s.eval(ids[a.prompt + 2:])
    cuda.cuProfilerStop()


if __name__ == "__main__":
    main()
