"""The ground-side compiler: prune, export, quantise and verify a zoo model into a bundle.

``onboard compile`` is the command; :func:`compile_model` is the same pipeline as a function.
Torch, ONNX, OpenVINO and NNCF are imported only inside the steps that need them.
"""

from onboard.compile.pipeline import (
    PRECISIONS,
    TARGETS,
    CompileOptions,
    CompileResult,
    compile_model,
    load_model,
    resolve_model,
)

__all__ = [
    "PRECISIONS",
    "TARGETS",
    "CompileOptions",
    "CompileResult",
    "compile_model",
    "load_model",
    "resolve_model",
]
