"""The project's one exception base. Every error a user can cause (a bad file, flag, path or value) is an
`OpenELMError` whose message names the file, line, key, flag or layer at fault; each CLI's `main` turns it into
one `error: ...` line and exit code 1 (`openelm_mlx.cli`). Anything else that escapes is a bug and keeps its
traceback. Pure Python.
"""

from __future__ import annotations


class OpenELMError(Exception):
    """Bad input to openelm-mlx; the message says what is wrong and where."""


class OutputExistsError(OpenELMError, FileExistsError):
    """An output path that exists and may not (or, with --force, cannot safely) be replaced."""


class TrainingError(OpenELMError, RuntimeError):
    """A training run (pre-training or fine-tuning) that cannot start or go on; the message says what to do."""


class NonFiniteError(OpenELMError, ValueError):
    """Tensors holding NaN or infinity, refused before anything is written or loaded."""


def nonfinite_message(source: str, counts: dict, sizes: dict | None = None, *, overflow_dtype: str | None = None,
                     action: str = "nothing was written") -> str:
    """One message naming every tensor with non-finite values (`counts`: name -> how many values)."""
    names = sorted(counts, key=lambda k: -counts[k])
    shown = ", ".join(f"{k} ({counts[k]:,}" + (f" of {sizes[k]:,}" if sizes and k in sizes else "") + ")"
                      for k in names[:8])
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    if overflow_dtype:
        return (f"{source}: {len(names)} tensor(s) overflow {overflow_dtype} (values beyond its range become "
                f"infinite): {shown}{more}; {action}. Use --dtype bfloat16 or --dtype float32")
    return f"{source}: {len(names)} tensor(s) hold NaN or infinite values: {shown}{more}; {action}"
