"""llama.cpp's side of the weight files, shared by benchmarks/llamacpp.py (speed) and benchmarks/quality.py
(perplexity): our MLX directory -> Hugging Face layout (`convert/mlx_to_hf.py`) -> GGUF (llama.cpp's own
`convert_hf_to_gguf.py`) -> Q8_0 / Q4_0 (its `llama-quantize`), and back: a GGUF read with llama.cpp's gguf-py,
de-quantized by its `gguf.quants`, under our weight names.

The way back undoes what llama.cpp's OpenELM converter (`conversion/openelm.py`, class `OpenELMModel`) does: it
renames every tensor with gguf-py's name map for the OPENELM architecture, and splits `ffn.proj_1` into `ffn_gate`
(its first ffn_dim rows) and `ffn_up` (the rest); it permutes nothing (no q/k row permutation, `qkv_proj` stays
fused as `attn_qkv`) and writes no separate output head (the embedding is tied).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_OUTTYPES = ("f32", "f16")
QUANT_TYPES = ("Q8_0", "Q4_0")


def gguf_env(llama: Path) -> dict:
    """The environment llama.cpp's Python tools need: its own gguf-py first on the path."""
    return {**os.environ, "PYTHONPATH": str(Path(llama) / "gguf-py")}


def export_hf(mlx_dir: Path, hf_dir: Path, dtype: str | None = None) -> Path:
    """Our MLX directory in Apple's Hugging Face layout (de-quantized if quantized), with its tokenizer."""
    cmd = [sys.executable, str(ROOT / "convert" / "mlx_to_hf.py"), "--mlx-path", str(mlx_dir), "--hf-path",
           str(hf_dir)]
    subprocess.run(cmd + (["--dtype", dtype] if dtype else []), check=True, stdout=subprocess.DEVNULL)
    return Path(hf_dir)


def hf_to_gguf(llama: Path, hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's convert_hf_to_gguf.py on an HF-layout directory (f32 or f16 GGUF)."""
    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: choose one of {GGUF_OUTTYPES}")
    subprocess.run([sys.executable, str(Path(llama) / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
                    "--outfile", str(out)], check=True, env=gguf_env(llama), capture_output=True)
    return Path(out)


def quantize_gguf(llama: Path, src: Path, out: Path, qtype: str) -> Path:
    """llama.cpp's llama-quantize with its default per-tensor choices for `qtype` (e.g. Q4_0 keeps the tied
    embedding/head at Q6_K)."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype {qtype!r}: choose one of {QUANT_TYPES}")
    subprocess.run([str(Path(llama) / "build" / "bin" / "llama-quantize"), str(src), str(out), qtype], check=True,
                   capture_output=True)
    return Path(out)


def _import_gguf(llama: Path):
    path = str(Path(llama) / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    return gguf


def gguf_names(cfg, llama: Path) -> dict[str, tuple[str, ...]]:
    """Our HF weight name -> the GGUF tensor name(s) llama.cpp's converter writes for it (proj_1: gate, up)."""
    from openelm_mlx.weights import expected_shapes

    gguf = _import_gguf(llama)
    n = cfg.num_transformer_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.OPENELM, n)
    out = {}
    for name in expected_shapes(cfg):
        if name.endswith(".ffn.proj_1.weight"):
            i = int(name.split(".")[2])
            out[name] = tuple(gguf.TENSOR_NAMES[t].format(bid=i) + ".weight"
                              for t in (gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP))
            continue
        mapped = name_map.get_name(name, try_suffixes=(".weight",))
        if mapped is None:
            raise KeyError(f"gguf-py has no OPENELM name for {name}")
        out[name] = (mapped,)
    return out


def read_gguf(path: Path, cfg, llama: Path) -> tuple[dict, dict]:
    """(weights, info) of a GGUF file written by llama.cpp for an OpenELM model.

    weights: our HF name -> float32 numpy array, de-quantized by gguf-py (`gguf.quants.dequantize`), proj_1
    re-assembled as [gate; up]. info: "types" (our name -> GGML type name(s)), "bits_per_weight" (all stored
    tensor bytes x 8 / all parameters, as ours counts scales and biases). Every tensor of the file must be used.
    """
    import numpy as np

    gguf = _import_gguf(llama)
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    if arch_name != "openelm":
        raise ValueError(f"{path}: architecture {arch_name!r}, expected 'openelm'")
    tensors = {t.name: t for t in reader.tensors}
    names = gguf_names(cfg, llama)
    unused = set(tensors) - {g for gs in names.values() for g in gs}
    missing = [g for gs in names.values() for g in gs if g not in tensors]
    if unused or missing:
        raise ValueError(f"{path}: tensors not in llama.cpp's OpenELM layout: unused {sorted(unused)[:4]}, "
                         f"missing {missing[:4]}")
    weights, types = {}, {}
    for name, parts in names.items():
        arrays = []
        for g in parts:
            t = tensors[g]
            # gguf-py gives the rows in numpy order: (ne[1], ne[0]) = (out features, in features) for a matrix
            arrays.append(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        weights[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        types[name] = "/".join(sorted({tensors[g].tensor_type.name for g in parts}))
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    nparams = sum(int(t.n_elements) for t in reader.tensors)
    return weights, {"types": types, "bits_per_weight": nbytes * 8 / nparams}
