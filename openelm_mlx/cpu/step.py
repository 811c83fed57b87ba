"""The whole one-token step in C (csrc/step.c), for a batch of one with the CPU's own KV cache.

A 270M one-token step in MLX is ~900 small ops between 65 projections, and each projection run in csrc/qgemv.c
evaluates its input, so the ops never overlap the kernels: at one thread a 4-bit token spent ~12 ms in the kernels
and ~9-57 ms waiting for those ops (docs/cpu-backend.md). Here the model is switched in place to `CPUModel`, whose
one-token calls with a `CPUKVCache` run every layer, the final norm and the tied head in one C call; everything
else (prompts, batches, LoRA-wrapped or otherwise unsupported layers, mlx-lm's own caches) takes the MLX path.

- `CPUKVCache` holds each layer's K/V in float32 buffers it owns (n_kv, capacity, head_dim); the C step appends to
  them in place, multi-token (MLX) calls store theirs there too. Every MLX array it hands out is a copy, so nothing
  another cache, a prompt-cache entry or a view can see is ever written. It follows mlx-lm's KVCache protocol
  (offset, update_and_fetch, state, trim, merge into a BatchKVCache, to_quantized, deepcopy).
- The step reads the weights where MLX keeps them (numpy views of the evaluated arrays); a plan of pointers is
  made on first use and made again when a layer or an array of the model was replaced. Supported weights: float32,
  affine 4/8-bit (groups 32/64/128, float32 scales or the half ones cpu.dtype keeps) and the float16 / bfloat16 weights
  `cpu.half` keeps (computed by qgemv.c's hgemv, as on the MLX path); `_matrix` is where a new kind is added, with
  its C side in csrc/step.c.

Results equal the MLX path's within float32 rounding (qgemv.c's float kernel), and within its int8 error bound
with its integer kernels (tests/test_c_step.py).
"""

from __future__ import annotations

import ctypes
import functools
import operator
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import switches
from ..config import layer_plan
from ..mlx_lm_parts import part
from ..model import RMS_NORM_EPS, Attention, Model, TransformerBlock
from . import half, quantized
from .rope import rope_table_below

SWITCH = "OPENELM_MLX_C_STEP"
MAT_F32, MAT_AFFINE, MAT_F16, MAT_BF16 = 0, 1, 2, 3  # csrc/step.c's step_matrix_t.kind
HALF_KINDS = {mx.float16: MAT_F16, mx.bfloat16: MAT_BF16}


class _Matrix(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("bits", ctypes.c_int), ("group_size", ctypes.c_int), ("n", ctypes.c_int),
                ("k", ctypes.c_int), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("biases", ctypes.c_void_p), ("scale_kind", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("ffn_norm", ctypes.c_void_p), ("qkv", _Matrix), ("out", _Matrix), ("proj_1", _Matrix),
                ("proj_2", _Matrix), ("n_q", ctypes.c_int), ("n_kv", ctypes.c_int), ("ffn_dim", ctypes.c_int)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int), ("model_dim", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("layers", ctypes.POINTER(_Layer)), ("norm", ctypes.c_void_p), ("embed", _Matrix),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("threads", ctypes.c_int),
                ("thread_weights", ctypes.c_int), ("variant", ctypes.c_int), ("half_variant", ctypes.c_int)]


class _KV(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("capacity", ctypes.c_int)]


@functools.lru_cache(maxsize=1)
def library() -> tuple[Optional[ctypes.CDLL], str]:
    """The kernel library with the step's signatures set, or (None, why not)."""
    lib, problem = quantized.kernel_library()
    if lib is None:
        return None, problem
    if not lib.openelm_step_supported():
        return None, "this CPU lacks AVX2/FMA (or is not x86-64)"
    lib.openelm_step.restype = ctypes.c_int
    lib.openelm_step.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_KV), ctypes.c_int, ctypes.c_int,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib, ""


# ------------------------------------------------------------------------------------------------ the KV cache

class CPUKVCache:
    """One layer's KV cache for the C step and the MLX path alike: float32 buffers (B, n_kv, capacity, head_dim)
    owned by this object, grown by `step` positions. Hands out copies only (see the module docstring)."""

    step = 256

    def __init__(self):
        self._k: Optional[np.ndarray] = None
        self._v: Optional[np.ndarray] = None
        self.offset = 0

    def _reserve(self, batch: int, heads: int, head_dim: int, positions: int) -> bool:
        """Room for `positions` positions of this shape (the held ones kept); False if the cache holds another
        shape."""
        if self._k is not None and self._k.shape[:2] + self._k.shape[3:] != (batch, heads, head_dim):
            if self.offset:
                return False
            self._k = self._v = None
        if self._k is not None and positions <= self._k.shape[2]:
            return True
        capacity = -(-positions // self.step) * self.step
        k, v = (np.empty((batch, heads, capacity, head_dim), np.float32) for _ in range(2))
        if self._k is not None:
            k[:, :, :self.offset], v[:, :, :self.offset] = self._k[:, :, :self.offset], self._v[:, :, :self.offset]
        self._k, self._v = k, v
        return True

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, n_kv, L, head_dim) keys and values (evaluating them); return all of them (copies)."""
        k, v = (np.asarray(a.astype(mx.float32)) for a in (keys, values))
        B, H, L, D = k.shape
        if not self._reserve(B, H, D, self.offset + L):
            raise ValueError(f"this KV cache holds {self._k.shape} keys; got {keys.shape}")
        self._k[:, :, self.offset:self.offset + L] = k
        self._v[:, :, self.offset:self.offset + L] = v
        self.offset += L
        out_k, out_v = self.keys, self.values
        return (out_k, out_v) if keys.dtype == mx.float32 else (out_k.astype(keys.dtype), out_v.astype(keys.dtype))

    @property
    def keys(self) -> Optional[mx.array]:
        return None if self._k is None else mx.array(self._k[:, :, :self.offset])  # a copy

    @property
    def values(self) -> Optional[mx.array]:
        return None if self._v is None else mx.array(self._v[:, :, :self.offset])

    def keys_and_values(self):
        return self.keys, self.values

    @property
    def state(self):
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, v):
        keys, values, offset = v
        self._k = self._v = None
        self.offset = 0
        if keys is not None:
            self.update_and_fetch(keys[:, :, :offset], values[:, :, :offset])

    @classmethod
    def from_state(cls, state):
        cache = cls()
        cache.state = state
        return cache

    def __deepcopy__(self, memo):
        new = CPUKVCache()
        new.offset = self.offset
        if self._k is not None:  # the held positions only
            new._k, new._v = (np.array(a[:, :, :self.offset]) for a in (self._k, self._v))
        return new

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self._k is None

    @property
    def nbytes(self) -> int:
        return 0 if self._k is None else self._k.nbytes + self._v.nbytes

    def make_mask(self, *args, **kwargs):
        return part("models.cache").create_attention_mask(*args, offset=self.offset, **kwargs)

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        """mlx-lm's QuantizedKVCache of these positions (--kv-bits); the model then takes the MLX path."""
        plain = part("models.cache").KVCache()
        if self._k is not None:
            plain.keys, plain.values = self.keys, self.values
        plain.offset = self.offset
        return plain.to_quantized(group_size=group_size, bits=bits)

    @classmethod
    def merge(cls, caches):
        """The batch cache of several caches (mlx-lm's BatchGenerator, when requests join a batch)."""
        return part("models.cache").BatchKVCache.merge(caches)


# ------------------------------------------------------------------------------------------------ the plan

class Unsupported(Exception):
    """A layer or array the C step cannot compute (the model keeps the MLX path)."""


class _Plan:
    """Pointers to a model's weights for csrc/step.c, with what they were read from (`refs`: container, key,
    object) so that a replaced layer or array is noticed (`current`)."""

    def __init__(self, model: Model):
        self.refs: list = []
        self._lookups = self._objects = None  # refs as columns, made on the first `current` call
        self.keep: list = []  # the numpy views and MLX arrays the pointers point into
        self.affine = self.half = False
        cfg = model.config
        t = self._child(model, "transformer")
        blocks = self._child(t, "layers")
        self.head_dim, self.dim = cfg.head_dim, cfg.model_dim
        self.layers = (_Layer * len(blocks))()
        self.n_kv, self.rope_base = [], None
        plans = layer_plan(cfg)
        if len(plans) != len(blocks):
            raise Unsupported(f"{len(blocks)} layers, the config says {len(plans)}")
        for i, p in enumerate(plans):
            self._layer(self._child(blocks, i), self.layers[i], i, p.ffn_dim)
        self.model = _Model(n_layers=len(blocks), model_dim=cfg.model_dim, head_dim=cfg.head_dim,
                            layers=self.layers, norm=self._norm(t, "norm", cfg.model_dim),
                            eps=RMS_NORM_EPS, scale=cfg.head_dim ** -0.5)
        self.model.embed = self._matrix(t, "token_embeddings", (cfg.vocab_size, cfg.model_dim), embedding=True)
        self.vocab = cfg.vocab_size

    def current(self) -> bool:
        """Whether every container still holds the object the plan read (checked on every step: one C-level pass,
        ~20 us for a 270M model's ~440 references, where a generator expression took ~140 us)."""
        if self._lookups is None:
            containers, keys, self._objects = zip(*self.refs) if self.refs else ((), (), ())
            self._lookups = (containers, keys)
        try:
            return all(map(operator.is_, map(operator.getitem, *self._lookups), self._objects))
        except (KeyError, IndexError, TypeError):
            return False

    def _child(self, container, key):
        child = container[key]
        self.refs.append((container, key, child))
        return child

    def _array(self, module, key: str, shape: tuple, dtype=mx.float32) -> int:
        a = self._child(module, key)
        if not isinstance(a, mx.array) or a.shape != shape or a.dtype != dtype:
            got = f"{a.dtype} {a.shape}" if isinstance(a, mx.array) else type(a).__name__
            raise Unsupported(f"{key}: {got}, the step needs {dtype} {shape}")
        view = np.asarray(a.view(mx.uint16) if a.dtype in half.HALF_DTYPES else a)  # numpy has no bfloat16
        if not view.flags.c_contiguous:
            view = np.ascontiguousarray(view)
        self.keep += [a, view]
        return view.ctypes.data

    def _norm(self, parent, name: str, dim: int) -> int:
        norm = self._child(parent, name)
        if type(norm) is not nn.RMSNorm or set(norm) != {"weight"}:
            raise Unsupported(f"{name}: {type(norm).__name__}")
        return self._array(norm, "weight", (dim,))

    def _matrix(self, parent, name: str, shape: tuple, embedding: bool = False) -> _Matrix:
        """A weight of shape (n, k) held by the layer parent[name]: float32 (nn.Linear / nn.Embedding), float16 /
        bfloat16 (cpu.half's layers) or affine 4/8-bit (the quantized layers, CPU classes included), nothing else
        (a LoRA layer, a bias, other bits)."""
        layer = self._child(parent, name)
        n, k = shape
        kind = type(layer)
        plain = (nn.Embedding,) if embedding else (nn.Linear,)
        halved = half.CPUHalfEmbedding if embedding else half.CPUHalfLinear
        if kind is halved and set(layer) == {"weight"} and layer["weight"].dtype in HALF_KINDS:
            if half.variant() is None:
                raise Unsupported(f"{name}: {layer['weight'].dtype}, and cpu.half's kernel is off ({half.SWITCH})")
            self.half = True
            dtype = layer["weight"].dtype
            return _Matrix(kind=HALF_KINDS[dtype], n=n, k=k, w=self._array(layer, "weight", (n, k), dtype))
        packed = ((nn.QuantizedEmbedding, quantized.CPUQuantizedEmbedding) if embedding
                  else (nn.QuantizedLinear, quantized.CPUQuantizedLinear))
        if kind in plain and set(layer) == {"weight"}:
            return _Matrix(kind=MAT_F32, n=n, k=k, w=self._array(layer, "weight", (n, k)))
        if kind in packed and set(layer) == {"weight", "scales", "biases"}:
            bits, group = layer.bits, layer.group_size
            if (getattr(layer, "mode", "affine") != "affine" or bits not in (4, 8) or group not in (32, 64, 128)
                    or k % (256 // bits) or k % group):
                raise Unsupported(f"{name}: {bits}-bit, group {group}, mode {getattr(layer, 'mode', 'affine')}")
            if quantized.qgemv_library()[0] is None:
                raise Unsupported(f"{name}: quantized, and csrc/qgemv.c is off ({quantized.QGEMV_ENV_VAR})")
            sdtype = layer["scales"].dtype
            if not quantized.scales_readable(sdtype, k // group):
                raise Unsupported(f"{name}: {sdtype} scales ({quantized.HALF_SCALES} or this CPU)")
            self.affine = True
            return _Matrix(kind=MAT_AFFINE, bits=bits, group_size=group, n=n, k=k,
                           w=self._array(layer, "weight", (n, k * bits // 32), mx.uint32),
                           scales=self._array(layer, "scales", (n, k // group), sdtype),
                           biases=self._array(layer, "biases", (n, k // group), sdtype),
                           scale_kind=quantized.SCALE_KINDS[sdtype])
        raise Unsupported(f"{name}: {kind.__name__} with {sorted(layer)}")

    def _layer(self, block, out: _Layer, i: int, F: int) -> None:
        if not isinstance(block, TransformerBlock):
            raise Unsupported(f"layer {i}: {type(block).__name__}")
        attn, ffn = self._child(block, "attn"), self._child(block, "ffn")
        if not isinstance(attn, Attention) or attn.rope_base != (self.rope_base or attn.rope_base):
            raise Unsupported(f"layer {i}: attention {type(attn).__name__} (RoPE base {attn.rope_base})")
        self.rope_base = attn.rope_base  # one RoPE row serves every layer
        D, hd, n_q, n_kv = self.dim, self.head_dim, attn.n_q, attn.n_kv
        if attn.head_dim != hd or n_kv < 1 or n_q % n_kv or hd % 2 or hd > 512:
            raise Unsupported(f"layer {i}: {n_q} query heads, {n_kv} KV heads of {attn.head_dim}")
        out.attn_norm, out.ffn_norm = self._norm(block, "attn_norm", D), self._norm(block, "ffn_norm", D)
        out.q_norm, out.k_norm = self._norm(attn, "q_norm", hd), self._norm(attn, "k_norm", hd)
        out.qkv = self._matrix(attn, "qkv_proj", ((n_q + 2 * n_kv) * hd, D))
        out.out = self._matrix(attn, "out_proj", (D, n_q * hd))
        out.proj_1 = self._matrix(ffn, "proj_1", (2 * F, D))
        out.proj_2 = self._matrix(ffn, "proj_2", (D, F))
        out.n_q, out.n_kv, out.ffn_dim = n_q, n_kv, F
        self.n_kv.append(n_kv)


def plan_for(model: Model) -> Optional[_Plan]:
    """The model's current plan, made or made again as needed; None (and the reason kept in
    `model._c_step_unsupported`) when the step cannot compute this model."""
    plan = getattr(model, "_c_step_plan", None)
    if plan is not None and plan.current():
        return plan
    try:
        plan = _Plan(model)
        model._c_step_unsupported = None
    except (Unsupported, KeyError, AttributeError) as e:
        plan = None
        model._c_step_unsupported = str(e) or type(e).__name__
    model._c_step_plan = plan
    return plan


def _usable_plan(model: Model) -> Optional[_Plan]:
    """plan_for(model), unless quantized products (QGEMV=off) or half ones (HALF=off) were switched off since it
    was made."""
    plan = plan_for(model)
    if plan is None or (plan.affine and quantized.qgemv_library()[0] is None) or (plan.half and half.variant() is None):
        return None
    return plan


def available(model: Model) -> bool:
    """Whether one-token steps of `model` can run in C here: switched on, the library built, the model's layers
    all supported."""
    return bool(switches.get(SWITCH)) and library()[0] is not None and _usable_plan(model) is not None


# ------------------------------------------------------------------------------------------------ the step

def one_token_step(model: Model, inputs: mx.array, cache, mask=None, *, threads: Optional[int] = None,
                   thread_weights: Optional[int] = None) -> Optional[mx.array]:
    """model(inputs, cache) by csrc/step.c: logits (1, 1, vocab), the caches advanced by one position; or None
    when this call is not one it can compute (then nothing was changed). threads / thread_weights: the split
    (default as quantized.py's products: all cores, for products of QGEMV_THREAD_WEIGHTS weights and more)."""
    if (mask is not None or model.training or inputs.shape != (1, 1) or not isinstance(cache, (list, tuple))
            or not switches.get(SWITCH) or not all(type(c) is CPUKVCache for c in cache)):
        return None
    lib = library()[0]
    plan = _usable_plan(model) if lib is not None else None
    if plan is None or len(cache) != len(plan.layers):
        return None
    position = cache[0].offset
    if any(c.offset != position for c in cache):
        return None
    token = inputs.item()
    if not 0 <= token < plan.vocab:
        return None
    if plan.affine:
        kernel = quantized.qgemv_kernel()
        plan.model.variant = 0 if kernel == "float" else quantized.QGEMV_VARIANTS[kernel]
    if plan.half:
        plan.model.half_variant = half.VARIANTS[half.variant()]
    plan.model.threads = threads or quantized.pool_threads()
    plan.model.thread_weights = quantized.QGEMV_THREAD_WEIGHTS if thread_weights is None else thread_weights
    kv = (_KV * len(cache))()
    for c, n_kv, slot in zip(cache, plan.n_kv, kv):
        if not c._reserve(1, n_kv, plan.head_dim, position + 1):
            return None
        slot.k, slot.v, slot.capacity = c._k.ctypes.data, c._v.ctypes.data, c._k.shape[2]
    cos, sin = _rope_rows(plan.head_dim, plan.rope_base, position)
    logits = np.empty(plan.vocab, np.float32)
    status = lib.openelm_step(ctypes.byref(plan.model), kv, token, position, cos, sin, logits.ctypes.data)
    if status != 0:
        raise RuntimeError(f"csrc/step.c refused the step (status {status}); the plan should have kept this model "
                           f"on the MLX path")
    for c in cache:
        c.offset += 1
    return mx.array(logits.reshape(1, 1, -1))


_rope_tables: dict = {}


def _rope_rows(dims: int, base: float, position: int) -> tuple[int, int]:
    """Addresses of the cos and signed-sin rows of `position` in cpu/rope.py's table (made by mx.fast.rope)."""
    cos, sin = rope_table_below(dims, base, position + 1)
    key = (dims, base, cos.shape[0])
    if key not in _rope_tables:
        _rope_tables[key] = (cos, sin, np.asarray(cos), np.asarray(sin))
    _, _, cos, sin = _rope_tables[key]
    return cos.ctypes.data + 4 * dims * position, sin.ctypes.data + 4 * dims * position


class CPUModel(Model):
    def __call__(self, inputs: mx.array, cache=None, mask=None) -> mx.array:
        logits = one_token_step(self, inputs, cache, mask)
        return logits if logits is not None else super().__call__(inputs, cache, mask)

    def steps_eagerly(self, cache) -> bool:
        """Whether one-token calls with `cache` run in C as they are made (nothing queued for MLX to overlap):
        generate_step and the server then hand each token out before computing the next."""
        return (isinstance(cache, (list, tuple)) and bool(cache) and all(type(c) is CPUKVCache for c in cache)
                and available(self))

    def make_cache(self) -> list:
        """CPU caches when the C step can run this model, else mlx-lm's."""
        if available(self):
            return [CPUKVCache() for _ in self.layers]
        return super().make_cache()


def use_c_step(model: nn.Module) -> bool:
    """Switch an OpenELM model to CPUModel in place (a subclass adding no parameters); whether it was."""
    if type(model) is Model:
        model.__class__ = CPUModel
        return True
    return type(model) is CPUModel

