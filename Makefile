PYTHON ?= python3
NVCC ?= nvcc
CUDA_ARCHS ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
CUDA_SRC := $(wildcard csrc/cuda/*.cu)
BUILD_DIR ?= build

.PHONY: build test bench cuda clean

# In-place build of the native extension (ds4/_native*.so).
build:
	$(PYTHON) ds4/_build.py >/dev/null

test: build
	$(PYTHON) -m pytest -q

bench: build
	$(PYTHON) -m pytest -q --benchmark-only --benchmark-enable tests

# The CUDA backend: a shared library the engine loads at run time
# (ds4/_ds4_cuda.so). Does nothing without nvcc.
CUDA_LIB := ds4/_ds4_cuda.so
CUDA_HDR := $(wildcard csrc/cuda/*.cuh) csrc/backend.h csrc/weights.h csrc/session_state.h csrc/qat_round.h
cuda: $(CUDA_LIB)

$(CUDA_LIB): $(CUDA_SRC) $(CUDA_HDR)
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	  echo "nvcc -> $@"; \
	  $(NVCC) -O3 -std=c++17 $(CUDA_ARCHS) -Icsrc -shared -Xcompiler -fPIC,-fvisibility=hidden \
	    $(CUDA_SRC) -o $@; \
	else echo "nvcc not found: skipping the CUDA backend"; fi

clean:
	rm -rf build ds4/_native*.so ds4/_ds4_cuda.so ds4/_native.c ds4/_native.o *.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
