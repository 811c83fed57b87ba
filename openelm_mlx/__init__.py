"""openelm-mlx: Apple's OpenELM (layer-wise scaled transformers) trained in PyTorch, run and fine-tuned in MLX.

Importing the package does not import mlx or torch; the public API below is loaded on first use. On Linux it
first loads an optimized BLAS for MLX's CPU backend (see `openelm_mlx.cpu.blas`; OPENELM_MLX_BLAS=none turns it off).
"""

from .cpu import blas as _blas

_blas.preload()  # must run before anything imports mlx.core

__version__ = "0.1.0"

_LAZY = {
    "OpenELMConfig": "config", "get_preset": "config", "layer_plan": "config", "load_config": "config",
    "Model": "model", "Tokenizer": "tokenizer", "load_model": "checkpoint", "save_model": "checkpoint",
    "load": "generate", "generate": "generate", "stream_generate": "generate", "batch_generate": "generate",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        # Bind every name this module exports: importing the submodule `generate` binds that name to the module.
        globals().update({n: getattr(module, n) for n, m in _LAZY.items() if m == _LAZY[name]})
        return globals()[name]
    raise AttributeError(f"module 'openelm_mlx' has no attribute {name!r}")
