"""Loading a DeepSeek V4 model file: `ds4.load`."""
import os
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field

from .errors import Error, ModelFormatError
from .gguf import GGUFFile
from .native import ffi, lib

DEFAULT_MODEL_FILE = "ds4flash.gguf"
BACKENDS = ("auto", "cpu", "cuda", "metal")
NUMERICS = ("qat", "exact", "qat-q8")


@dataclass(frozen=True)
class Config:
    """Model shape, read from the GGUF metadata (names follow forward-pass.md §1)."""
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    n_expert: int
    n_expert_used: int
    expert_ff: int
    n_shared_experts: int
    n_hash_layers: int
    sliding_window: int
    indexer_heads: int
    indexer_dim: int
    indexer_top_k: int
    n_hc: int
    sinkhorn_iters: int
    rope_orig_ctx: int
    rope_freq_base: float
    compress_rope_freq_base: float
    rope_scaling_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    expert_weights_scale: float
    rms_eps: float
    hc_eps: float
    expert_weights_norm: bool
    compress_ratios: tuple = field(default=())
    swiglu_clamp: tuple = field(default=())
    expert_types: tuple = field(default=())   # per layer: (gate, up, down) type names
    variant: str = ""                          # "q2", "q4" or "mixed"
    is_flash: bool = False
    profile: str = ""                          # "DeepSeek V4 Flash" or "custom shape: ..."


def resolve_model_path(path=None):
    """path, else $DS4_MODEL, else ./ds4flash.gguf, else the download directory."""
    if path is not None:
        return os.fspath(path)
    tried = []
    env = os.environ.get("DS4_MODEL")
    if env:
        return env
    tried.append("$DS4_MODEL (unset)")
    if os.path.exists(DEFAULT_MODEL_FILE):
        return DEFAULT_MODEL_FILE
    tried.append(f"./{DEFAULT_MODEL_FILE}")
    from .paths import downloaded_models
    found = downloaded_models()
    if found:
        return found[0]
    tried.append("the download directory")
    raise Error("no model given and none found (tried " + ", ".join(tried) +
                "): pass a path, set DS4_MODEL, or run `ds4 download`")


class Model:
    """An open model: mapped weights, shape, tokenizer (see `ds4.load`)."""

    def __init__(self, path, *, backend="auto", ctx=32768, threads=None, numerics="qat",
                 synthetic=False):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
        if backend == "metal":
            raise Error(f"backend {backend!r} is not available in this build")
        if int(ctx) <= 0:
            raise ValueError(f"ctx must be positive, got {ctx}")
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise Error(f"{self.path}: no such model file")
        err = ffi.new("char[512]")
        out = ffi.new("ds4_model **")
        if lib.ds4_model_open(self.path.encode(), out, err, len(err)) != 0:
            raise ModelFormatError(f"{self.path}: {ffi.string(err).decode('utf-8', 'replace')}")
        self._m = out[0]
        self.backend = self._attach_backend(backend, bool(synthetic))
        self.ctx = int(ctx)
        self.threads = threads
        self.numerics = numerics
        # Benchmarks on a sparse generated file: a GPU backend fills its copy of the
        # weights with random valid blocks; the CPU reads the file's zeros as they are.
        self.synthetic = bool(synthetic)
        self.gguf = GGUFFile._borrowed(self.path, lib.ds4_model_gguf(self._m), self)
        self.config = self._read_config()
        self.warnings = [ffi.string(lib.ds4_model_warning(self._m, i)).decode("utf-8", "replace")
                         for i in range(lib.ds4_model_n_warnings(self._m))]
        for w in self.warnings:
            warnings.warn(f"{self.path}: {w}", stacklevel=3)
        self._tokenizer = None
        self._sessions = weakref.WeakSet()
        self._closed = False
        self._live = None        # the session generate() reuses across calls

    def _attach_backend(self, backend, synthetic):
        """"cpu" or "cuda"; "auto" is cuda when its library and a GPU are there and
        take the model, else the CPU (with a warning when a GPU was there)."""
        if backend == "cpu":
            return "cpu"
        library = cuda_library()
        err = ffi.new("char[512]")
        report = progress_callback(LoadProgress(f"{os.path.basename(self.path)} to the GPU"))
        rc = lib.ds4_model_use_backend(self._m, b"cuda", (library or "").encode(), int(synthetic),
                                       report, ffi.NULL, err, len(err))
        if rc == 0:
            return "cuda"
        reason = ffi.string(err).decode("utf-8", "replace")
        if backend == "auto":
            if rc != UNAVAILABLE:   # there is a GPU, but it cannot take this model
                warnings.warn(f"{self.path}: running on the CPU: backend 'cuda': {reason}",
                              stacklevel=4)
            return "cpu"
        lib.ds4_model_close(self._m)
        self._m = None
        raise Error(f"{self.path}: backend 'cuda': {reason}")

    @property
    def _handle(self):
        if self._m is None:
            raise Error(f"{self.path}: the model is closed")
        return self._m

    def warm(self, progress=None):
        """Reads the weights once into the page cache, so the first tokens do not
        wait on the disk; progress(done_bytes, total_bytes), else a line on stderr
        when it takes a while. Returns the bytes read. (A GPU backend has read
        them already, copying them to the device.)"""
        report = progress or LoadProgress(f"reading {os.path.basename(self.path)}")
        return lib.ds4_model_warm(self._handle, progress_callback(report), ffi.NULL)

    def session(self, ctx=None, *, numerics=None, threads=None):
        """A new, empty KV state (ctx defaults to the model's)."""
        from .session import Session
        if self._closed:
            raise Error(f"{self.path}: the model is closed")
        s = Session(self, ctx, numerics=numerics, threads=threads)
        self._sessions.add(s)
        return s

    def generate(self, prompt_or_messages, *, max_tokens=256, temperature=1.0, top_p=1.0,
                 top_k=0, min_p=0.05, seed=None, think="high", system=None, stop=None,
                 stream=False):
        """Continues a prompt (one user turn) or a conversation (list of messages).

        Returns a ds4.Generation (answer in .text, thinking in
        .reasoning), or with stream=True an iterator of text pieces (str with
        .kind "reasoning" or "answer"). temperature=0 is greedy. Reuses the
        model's live session for the common token prefix."""
        from . import generation as gen
        from .sampling import Sampler
        ids, thinking = gen.prompt_ids(self.tokenizer, prompt_or_messages, think=think,
                                       system=system, ctx=self.ctx)
        if len(ids) + max_tokens > self.ctx:
            raise Error(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the "
                        f"context of {self.ctx} tokens")
        if self._live is None:
            self._live = self.session(self.ctx)
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          seed=seed)
        result = gen.Generation()
        pieces = gen.stream(self._live, self.tokenizer, ids, max_tokens=max_tokens,
                            sampler=sampler, thinking=thinking, stop=stop, result=result)
        if stream:
            return pieces
        for _ in pieces:
            pass
        return result

    def _read_config(self):
        c = lib.ds4_model_config(self._m)
        values = {name: getattr(c, name) for name, _ in ffi.typeof("ds4_config").fields}
        values["expert_weights_norm"] = bool(values["expert_weights_norm"])
        n = values["n_layer"]
        type_name = lambda t: ffi.string(lib.ds4_type_name(t)).decode()
        return Config(
            **values,
            compress_ratios=tuple(lib.ds4_model_layer_compress_ratio(self._m, l) for l in range(n)),
            swiglu_clamp=tuple(lib.ds4_model_layer_swiglu_clamp(self._m, l) for l in range(n)),
            expert_types=tuple(tuple(type_name(lib.ds4_model_layer_expert_type(self._m, l, w))
                                     for w in range(3)) for l in range(n)),
            variant=ffi.string(lib.ds4_model_variant(self._m)).decode(),
            is_flash=bool(lib.ds4_model_is_flash(self._m)),
            profile=ffi.string(lib.ds4_model_profile_note(self._m)).decode(),
        )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            try:
                self._tokenizer = Tokenizer.from_gguf_metadata(self.gguf.metadata)
            except ModelFormatError as exc:
                raise ModelFormatError(f"{self.path}: {exc}") from None
        return self._tokenizer

    def close(self):
        """Releases the weights once no session uses them any more."""
        self._closed = True
        if not getattr(self, "_sessions", None):
            self._free()

    def _free(self):
        if getattr(self, "_m", None) is not None:
            self.gguf.close()
            lib.ds4_model_close(self._m)
            self._m = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self._free()

    def __repr__(self):
        c = self.config
        return (f"<ds4.Model {os.path.basename(self.path)}: {c.profile}, {c.variant}, "
                f"{c.n_layer} layers, backend={self.backend}>")


UNAVAILABLE = -2   # ds4_model_use_backend: no library or no device


class LoadProgress:
    """A progress line on stderr while weights are read or copied, once the work
    has taken more than a second (a tiny model loads silently)."""

    def __init__(self, what):
        self.what = what
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, done, total):
        elapsed = time.monotonic() - self.start
        if elapsed < 1 and not self.shown:
            return
        self.shown = True
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\rds4: {self.what}: {done / 2**30:.1f} / {total / 2**30:.1f} GiB "
                         f"({done / 2**30 / max(elapsed, 1e-9):.1f} GiB/s)" + end)
        sys.stderr.flush()


def progress_callback(report):
    """A native ds4_progress_fn calling report(done, total); keep it alive for the call."""
    return ffi.callback("void(void *, int64_t, int64_t)",
                        lambda _user, done, total: report(done, total))


def copy_bandwidth(model, nbytes=1 << 30, repeats=5):
    """The model's backend's device-memory copy bandwidth (bytes/s, read + write)."""
    out = ffi.new("double *")
    err = ffi.new("char[512]")
    if lib.ds4_model_copy_bandwidth(model._handle, nbytes, repeats, out, err, len(err)) != 0:
        raise Error(f"copy bandwidth: {ffi.string(err).decode('utf-8', 'replace')}")
    return out[0]


def cuda_library():
    """The CUDA backend library: $DS4_CUDA_LIB, else ds4/_ds4_cuda.so when built; or None."""
    env = os.environ.get("DS4_CUDA_LIB")
    if env:
        return env
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ds4_cuda.so")
    return path if os.path.exists(path) else None


_cached = {}


def generate(prompt, *, model=None, **kwargs):
    """Model.generate on `model` (a path, a Model, or None for the default model,
    loaded once and cached)."""
    if not isinstance(model, Model):
        path = resolve_model_path(model)
        if path not in _cached:
            _cached[path] = load(path)
        model = _cached[path]
    return model.generate(prompt, **kwargs)


def load(path=None, *, backend="auto", ctx=32768, threads=None, numerics="qat",
         synthetic=False):
    """Open and validate a DeepSeek V4 GGUF (raises ds4.ModelFormatError if it is not one)."""
    return Model(resolve_model_path(path), backend=backend, ctx=ctx, threads=threads,
                 numerics=numerics, synthetic=synthetic)
