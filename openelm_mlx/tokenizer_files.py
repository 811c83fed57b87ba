"""Tokenizer files for other tools (mlx-lm, transformers, llama.cpp's converter): besides Llama-2's
`tokenizer.model`, a `tokenizer.json` that reproduces SentencePiece exactly (with BOS), because transformers 5 given
only the `.model` file builds a tokenizer that adds no BOS and drops the leading-space piece; and the
OpenELM-Instruct chat template in Jinja, made from the same pieces as `tokenizer.chat_text`."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from .tokenizer import GENERATION_PROMPT, TURN

# `tokenizer.chat_text` in Jinja, for tools that render chat templates: the same turn text, role and content as
# Jinja expressions.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 + TURN.format(role="{{ m['role'] }}", content="{{ m['content'] }}")
                 + "{% endfor %}{% if add_generation_prompt %}" + GENERATION_PROMPT + "{% endif %}")


def _tokenizer_json(sp_model: Path) -> str:
    stat = Path(sp_model).stat()
    return _tokenizer_json_cached(str(Path(sp_model).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _tokenizer_json_cached(sp_model: str, mtime_ns: int, size: int) -> str:
    """A `tokenizers` BPE pipeline equal to SentencePiece's encoding of Llama-2's model, with BOS.

    Merges are every split of a piece into two pieces, ranked by the merged piece's score (SentencePiece BPE
    merges the highest-scoring pair first; Llama-2's whitespace-run pieces score -1e9 and so merge last). The
    dummy prefix is a normalizer (`Prepend`), not Metaspace, which skips it before a leading space.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.vocab_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    get = vocab.get
    normal = [not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)) for i in range(n)]
    ranked = sorted((-sp.get_score(i), i, left, right)
                    for i, piece in enumerate(pieces) if normal[i] for k in range(1, len(piece))
                    if (left := get(piece[:k])) is not None and (right := get(piece[k:])) is not None)
    merges = [(pieces[left], pieces[right]) for *_, left, right in ranked]
    unk, bos, eos = (sp.id_to_piece(sp.unk_id()), sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, sp.bos_id())])
    return tok.to_str()


def write_tokenizer_files(path: str | Path, tokenizer_model: str | Path, chat_template: bool = False) -> None:
    """Copy `tokenizer.model` into the directory `path` and write `tokenizer.json`, `tokenizer_config.json`
    and `special_tokens_map.json` so that transformers / `mlx_lm.load` tokenize exactly like SentencePiece with
    BOS. `chat_template` adds the OpenELM-Instruct template (only for Instruct models: mlx-lm applies a
    template whenever one is present)."""
    path = Path(path)
    tokenizer_model = Path(tokenizer_model)
    if tokenizer_model.resolve() != (path / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    (path / "tokenizer.json").write_text(_tokenizer_json(tokenizer_model), encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    # PreTrainedTokenizerFast loads tokenizer.json as is; transformers 5's LlamaTokenizer would rebuild the
    # pipeline and lose the exact SentencePiece behaviour.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 2048,
              "padding_side": "left"}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
