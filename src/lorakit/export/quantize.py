"""The weight types people run that lorakit does not encode itself (k-quants, q4_0), made by llama.cpp's own
quantizer: llama-cpp-python's binding of llama_model_quantize, applied to an f32 GGUF that export/gguf.py wrote.
llama.cpp chooses each tensor's type as its `llama-quantize` tool does (a Q4_K_M file keeps some tensors in Q6_K,
and a tensor whose rows do not fill its blocks falls back to a type that fits)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..errors import ExportError

# --quant name -> llama.cpp's file type (LLAMA_FTYPE_MOSTLY_<name>)
LLAMA_QUANTS = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def llama_quantize(source: Path, out: Path, quant: str) -> None:
    """Quantize the GGUF file `source` into `out` as `quant` (a key of LLAMA_QUANTS) with llama.cpp."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"--quant {quant} is made by llama.cpp's own quantizer, from llama-cpp-python: "
                          "pip install llama-cpp-python (it builds llama.cpp; on some CPUs "
                          "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" is needed), or choose --quant f16 or q8_0") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_QUANTS[quant]}")
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not Path(out).is_file():
        raise ExportError(f"llama.cpp could not quantize {source} to {quant} (llama_model_quantize returned {code}); "
                          "its log above says why")
