"""RoPE tables for the CPU layer's one-token steps (cpu/decode.py, cpu/step.py) and prompts (cpu/prompt.py): the
cos and signed sin of each position, made by mx.fast.rope itself so that the values are the ones it uses."""

from __future__ import annotations

import functools

import mlx.core as mx


@functools.lru_cache(maxsize=4)
def _rope_table(dims: int, base: float, size: int) -> tuple[mx.array, mx.array]:
    """(cos, signed sin), each (size, dims), with mx.fast.rope(x, position p) == x * cos[p] + swap(x) * sin[p],
    swap exchanging the two halves of the last axis (non-traditional RoPE). Made by mx.fast.rope itself, from
    the basis rows [1, ..., 1, 0, ..., 0], so the values are the ones it uses."""
    half = dims // 2
    basis = mx.concatenate([mx.ones((1, 1, size, half)), mx.zeros((1, 1, size, half))], axis=-1)
    rotated = mx.fast.rope(basis, dims, traditional=False, base=base, scale=1.0, offset=0)[0, 0]
    cos, sin = rotated[:, :half], rotated[:, half:]  # rows [cos, sin] of each position's angles
    table = mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1)
    mx.eval(table)
    return table


def rope_table_below(dims: int, base: float, bound: int) -> tuple[mx.array, mx.array]:
    """`_rope_table` of positions 0 .. at least bound - 1 (4096 rows, doubled as needed: a few tables in all)."""
    size = 4096
    while size < bound:
        size *= 2
    return _rope_table(dims, base, size)
