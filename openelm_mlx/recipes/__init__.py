"""Apple's OpenELM pre-training recipes as trainer settings files (`python -m openelm_mlx.train -c openelm-270m`).

One YAML per released size, following apple/corenet `projects/openelm/pretraining_configs/openelm_{270M,450M,
1_1B,3B}.yaml` (and the paper, arXiv:2404.14619); each has a `-smoke` variant scaled down to one GPU or a CPU.
Pure Python: the trainer reads the files, this module only finds them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import OpenELMError

RECIPES_DIR = Path(__file__).resolve().parent
SIZES = ("270m", "450m", "1_1b", "3b")


class RecipeError(OpenELMError, ValueError):
    """A settings name that is neither a file nor a packaged recipe."""


def names() -> list[str]:
    """The packaged recipe names (file stems), e.g. `openelm-270m`, `openelm-270m-smoke`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def find(name_or_path: str | Path) -> Path:
    """A settings file: an existing path as given, else a packaged recipe by name ('openelm-1.1b' = 'openelm-1_1b')."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name.lower().removesuffix(".yaml").removesuffix(".yml").replace(".", "_")
    candidate = RECIPES_DIR / f"{stem}.yaml"
    if str(path.parent) == "." and candidate.exists():
        return candidate
    raise RecipeError(f"{name_or_path}: no such settings file or packaged recipe; recipes: "
                            f"{', '.join(names())}")
