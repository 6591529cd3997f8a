"""cffi (API, out-of-line) description of the native engine `ds4._native`.

The C declarations handed to cffi are the public headers that csrc/ds4.h
includes, with preprocessor lines dropped: those headers are written in the
subset of C that cffi's parser reads (plain prototypes, enums, opaque structs).
"""
import glob
import os
import re
import sysconfig

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = "csrc"


def public_headers():
    umbrella = os.path.join(ROOT, CSRC, "ds4.h")
    with open(umbrella) as f:
        return [os.path.join(ROOT, CSRC, name)
                for name in re.findall(r'#include\s+"([^"]+)"', f.read())]


def cdef_source():
    parts = []
    for path in public_headers():
        with open(path) as f:
            parts.append("".join(line for line in f
                                 if not line.lstrip().startswith("#")))
    return "\n".join(parts)


def compile_args():
    # -ffp-contract=off: no a * b + c fused unless the code says so (GCC's
    # default at -std=c11, not clang's), so kernels that must give the same
    # bits (quants_avx2.c's one- and two-token twins) do on every compiler
    args = ["-O3", "-std=c11", "-ffp-contract=off", "-D_GNU_SOURCE", "-pthread",
            "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
    if os.environ.get("DS4_DEBUG_BUILD"):
        args += ["-O0", "-g", "-fsanitize=address,undefined",
                 "-fno-omit-frame-pointer"]
    return args


ffibuilder = FFI()
ffibuilder.cdef(cdef_source())
ffibuilder.set_source(
    "ds4._native",
    '#include "ds4.h"',
    sources=sorted(os.path.relpath(p, ROOT)
                   for p in glob.glob(os.path.join(ROOT, CSRC, "*.c"))),
    include_dirs=[CSRC],
    extra_compile_args=compile_args(),
    extra_link_args=["-pthread"] + (["-fsanitize=address,undefined"]
                                    if os.environ.get("DS4_DEBUG_BUILD") else []),
    libraries=["m", "dl"],
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(verbose=True)
