"""The one tokenizer wrapper: OpenELM's SentencePiece model (Llama-2's `tokenizer.model`), BOS/EOS handling
and a streaming detokenizer that is exact for byte-fallback and leading-space pieces.

Apple's OpenELM repos ship no tokenizer; their instructions load Llama-2's (`meta-llama/Llama-2-7b-hf`), and
prompts start with BOS.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from .errors import OpenELMError

TOKENIZER_FILE = "tokenizer.model"


class TokenizerError(OpenELMError, ValueError):
    pass


def find_tokenizer_file(path: str | Path) -> Path:
    """`path` itself if it is a file, else `path/tokenizer.model`."""
    path = Path(path)
    candidate = path / TOKENIZER_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise TokenizerError(f"{candidate}: no SentencePiece tokenizer.model there")
    return candidate


class Tokenizer:
    """SentencePiece tokenizer with OpenELM's conventions (BOS prepended by default, EOS id for stopping)."""

    def __init__(self, path: str | Path):
        self.path = find_tokenizer_file(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a valid SentencePiece model ({e})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.vocab_size = self.sp.vocab_size()
        # Bytes each piece contributes to decoded text; the detokenizer concatenates these.
        self._piece_bytes = [self._bytes_of(i) for i in range(self.vocab_size)]

    def _bytes_of(self, i: int) -> bytes:
        sp = self.sp
        if sp.is_control(i):
            return b""
        if sp.is_byte(i):
            return bytes([int(sp.id_to_piece(i)[3:5], 16)])  # "<0xAB>"
        if sp.is_unknown(i):
            return " \u2047 ".encode()  # SentencePiece renders <unk> as " ⁇ "
        return sp.id_to_piece(i).replace("\u2581", " ").encode()

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.eos_id}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        try:
            ids = [operator.index(i) for i in ids]  # ints of any kind (numpy too), never floats
        except TypeError:
            raise TokenizerError("token ids must be whole numbers") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids must be in [0, {self.vocab_size}); got {bad[:4]}")
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `chat_text(messages)`, with each `</s>` as the EOS id (as HF's Llama tokenizer does)."""
        text = chat_text(messages, add_generation_prompt)
        ids = [self.bos_id]
        segments = text.split(EOS_TEXT)
        for i, segment in enumerate(segments):
            if segment:
                ids += self.sp.encode(segment)
            if i < len(segments) - 1:
                ids.append(self.eos_id)
        return ids


EOS_TEXT = "</s>"
CHAT_ROLES = ("system", "user", "assistant")
# The template's pieces, the one source for `chat_text` and the Jinja template written for other tools.
TURN = "<|{role}|>\n{content}" + EOS_TEXT + "\n"
GENERATION_PROMPT = "<|assistant|>\n"


def chat_text(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The OpenELM-Instruct (zephyr-style) template: `<|user|>\n{msg}</s>\n<|assistant|>\n`.

    The role markers are plain text; `</s>` is the EOS token.
    """
    out = []
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise TokenizerError(f"message {i}: expected {{'role': one of {CHAT_ROLES}, 'content': str}}, got {m!r}")
        out.append(TURN.format(role=role, content=content))
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


class StreamingDetokenizer:
    """Turns tokens into text one at a time; `add_token` returns the newly completed text.

    A multi-byte character split over byte-fallback pieces is held back until it is complete, and the leading
    space of the very first piece is dropped, as SentencePiece's own decode does.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._piece_bytes = tokenizer._piece_bytes
        self.reset()

    def reset(self):
        self._pending = b""
        self._started = False
        self.text = ""
        self.tokens: list[int] = []

    def add_token(self, token: int) -> str:
        self.tokens.append(int(token))
        self._pending += self._piece_bytes[int(token)]
        if not self._started and self._pending:
            if self._pending.startswith(b" "):
                self._pending = self._pending[1:]
            self._started = True
        new = self._take_complete()
        self.text += new
        return new

    def _take_complete(self) -> str:
        data = self._pending
        # Keep back at most 3 trailing bytes that could start an unfinished UTF-8 sequence.
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if cut < len(data) and not _is_utf8_prefix(data[cut:]):
                break  # the tail can never complete; fall through to a lossy decode
            self._pending = data[cut:]
            return text
        self._pending = b""
        return data.decode("utf-8", errors="replace")

    def finalize(self) -> str:
        """Flush what is left (an incomplete byte sequence becomes U+FFFD, as in SentencePiece)."""
        new = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        self.text += new
        return new


def _is_utf8_prefix(tail: bytes) -> bool:
    """True if `tail` is the start of a UTF-8 multi-byte sequence that more bytes could complete."""
    lead = tail[0]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 0
    return need > len(tail) and all(b >> 6 == 0b10 for b in tail[1:])
