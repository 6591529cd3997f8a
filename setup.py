# The native engine is compiled here, at install time, through cffi's
# out-of-line API mode (ds4/_build.py describes the extension). When nvcc is
# on PATH the CUDA backend (ds4/_ds4_cuda.so, loaded at run time) is built
# too; without nvcc, or if that build fails, ds4 installs CPU-only.
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

CUDA_ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


class BuildWithCuda(build_ext):
    def run(self):
        super().run()
        nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
        if not nvcc:
            return
        out_dir = "ds4" if self.inplace else os.path.join(self.build_lib, "ds4")
        os.makedirs(out_dir, exist_ok=True)
        cmd = [nvcc, "-O3", "-std=c++17", *CUDA_ARCHS, "-Icsrc", "-shared", "-Xcompiler",
               "-fPIC,-fvisibility=hidden", *sorted(glob.glob("csrc/cuda/*.cu")),
               "-o", os.path.join(out_dir, "_ds4_cuda.so")]
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"warning: the CUDA backend was not built ({exc}); ds4 runs on the CPU",
                  file=sys.stderr)


setup(cffi_modules=["ds4/_build.py:ffibuilder"], cmdclass={"build_ext": BuildWithCuda})
