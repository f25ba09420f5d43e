"""A compiled CPU kernel for the element-wise part of `lenslab.train.chunked_kl`: one pass per row, not per operation.

Per chunk of [positions x tokens, vocab] logits, `chunked_kl` needs the KL of each row and its gradient
softmax(q) - p. Eager PyTorch computes them with about ten operations, each a pass over the whole chunk through
memory; on the CPU benchmark those passes were most of a training step (docs/benchmarks.md). `fused_kl.c` does the
same arithmetic row by row, while the row is in the core's cache.

It is compiled on first use by the system's GCC (`-O3 -march=native -ffast-math -fopenmp`, about 0.3 s, in a
temporary directory removed once the library is loaded) and loaded with ctypes. GCC on Linux is required because the
speed comes from glibc's vectorised `expf`, which GCC calls under -ffast-math; the library is linked without
-ffast-math, which would otherwise switch the whole process to flushing denormal numbers to zero. Its OpenMP loop
runs on `torch.get_num_threads()` threads of the libgomp that torch itself loaded (the dynamic linker resolves the
library's libgomp.so.1 to it), so the kernel and torch's operations share one thread pool rather than contending
(on Python threads, against torch's spinning OpenMP workers, two-core steps gained 3% over the PyTorch path
instead of 35%). Where it cannot be built, or with `LENSLAB_NATIVE_KL=0` in the environment, `native_kl()` returns
None and `chunked_kl` uses PyTorch operations, which agree to rounding.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources

import torch
from torch import Tensor

log = logging.getLogger(__name__)

DISABLE_VARIABLE = "LENSLAB_NATIVE_KL"
"""Set to 0 to always use the PyTorch operations (for comparisons, or to rule the kernel out)."""

_FUNCTIONS = {torch.bfloat16: "kl_rows_bf16", torch.float32: "kl_rows_f32"}


class NativeKL:
    """The loaded kernel; call it on one chunk."""

    def __init__(self, library: ctypes.CDLL):
        self._functions = {}
        for dtype, name in _FUNCTIONS.items():
            function = getattr(library, name)
            function.restype = ctypes.c_int
            function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int]
            self._functions[dtype] = function

    def __call__(self, gap: Tensor, log_p: Tensor, p: Tensor, grad: Tensor, kl: Tensor, scale: float) -> None:
        """Write each row's KL(p || q) into `kl` and its gradient with respect to the lens logits into `grad`.

        gap: [rows, vocab] lens logits minus target logits before the logit scale, bfloat16 or float32; row r
        belongs to token r % tokens; log_p, p: [tokens, vocab] float32 target log-probabilities and probabilities;
        grad: like `gap` (written; may be `gap` itself, since each row is read whole before it is written); kl: [rows]
        float32 (written). All contiguous CPU tensors, `gap` and `log_p` finite.
        """
        rows, vocab = gap.shape
        if not (gap.dtype == grad.dtype and all(t.is_contiguous() for t in (gap, log_p, p, grad, kl))):
            raise ValueError("NativeKL expects contiguous tensors, with grad of gap's dtype.")
        pointers = [t.data_ptr() for t in (gap, log_p, p, grad, kl)]
        threads = max(1, min(torch.get_num_threads(), rows))
        if self._functions[gap.dtype](*pointers, rows, len(p), vocab, scale, threads):
            raise MemoryError(f"The KL kernel could not allocate {threads} row buffers of {vocab} floats.")


@functools.cache
def native_kl() -> NativeKL | None:
    """The compiled kernel, built once per process; None where it cannot be (see the module docstring)."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None
    compiler = shutil.which("gcc")
    if platform.system() != "Linux" or compiler is None:
        log.info("No GCC on Linux here: the chunked KL runs on PyTorch operations (slower on CPU).")
        return None
    source = resources.files("lenslab.train").joinpath("fused_kl.c").read_text()
    with tempfile.TemporaryDirectory(prefix="lenslab-kl-") as directory:
        c_file, object_file, library_file = (os.path.join(directory, f"fused_kl.{ext}") for ext in ("c", "o", "so"))
        with open(c_file, "w") as handle:
            handle.write(source)
        commands = [
            [compiler, "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c", c_file, "-o", object_file],
            [compiler, "-shared", "-fopenmp", object_file, "-o", library_file, "-lm"],
        ]
        try:
            for command in commands:
                subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
            return NativeKL(ctypes.CDLL(library_file))
        except (OSError, AttributeError, subprocess.SubprocessError) as error:  # AttributeError: a function missing
            detail = getattr(error, "stderr", None) or error
            log.warning("Could not build the KL kernel, so the chunked KL runs on PyTorch operations: %s", detail)
            return None
