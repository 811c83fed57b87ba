"""Reading text and JSONL files with errors that name the file and line: the one reader behind LoRA data,
perplexity, the trainer's sources and prepare_data. Lines end at "\n" only (U+2028, U+2029 and U+0085 are valid
inside JSON strings); .gz and .zst files are decompressed. Pure Python (zstandard only for .zst files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .errors import OpenELMError


class DataError(OpenELMError, ValueError):
    """Training data that cannot be used; the message names the file (and line)."""


def read_text_file(path: Path) -> str:
    """A UTF-8 text file; errors name the file (and the line of a bad byte)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    raw = _decompress(path, raw)
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; give it some text or leave it out of --data")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _decompress(path: Path, raw: bytes) -> bytes:
    """.gz and .zst files (RedPajama and Dolma ship .jsonl.gz / .jsonl.zst) are read whole, decompressed."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            import gzip

            return gzip.decompress(raw)
        if name.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise DataError(f"{path}: reading .zst files needs the zstandard package: pip install zstandard") \
                    from None
            return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    except DataError:
        raise
    except Exception as e:  # gzip / zstandard raise several types for a corrupt file
        raise DataError(f"{path}: cannot decompress ({type(e).__name__}: {e})") from None
    return raw


def jsonl_objects(path: Path, text: str, first_line: int = 1) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file's `text` (whose first line is line
    `first_line` of the file); errors name the file and line."""
    # Lines end at "\n" only: U+2028, U+2029 and U+0085 are valid inside JSON strings (str.splitlines splits them).
    for lineno, line in enumerate(text.split("\n"), first_line):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def jsonl_text_rows(path: Path, text: str, first_line: int = 1) -> Iterator[tuple[int, str]]:
    """(line number, "text" field) of each non-blank line of a JSONL file's `text`; errors name file and line."""
    for lineno, row in jsonl_objects(path, text, first_line):
        if not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string \"text\" field, got {sorted(row)}")
        yield lineno, row["text"]
