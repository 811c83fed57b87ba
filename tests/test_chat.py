"""`python -m openelm_mlx.chat` through a pseudo-terminal: multi-turn replies equal a fresh generation on the
whole conversation (so the KV-cache reuse between turns is exact), `/reset` starts over, `/system` changes the
prompt, the context guard refuses a message that cannot fit, and `/exit` quits."""

import importlib
import os
import sys

import pytest

from conftest import ROOT, shared_file

pexpect = pytest.importorskip("pexpect")
gen = importlib.import_module("openelm_mlx.generate")
pytestmark = pytest.mark.slow  # a child process loads the model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from model_dirs import reference_model, save_tiny

    return save_tiny(tmp_path_factory.mktemp("chat") / "tiny", reference_model(0),
                     shared_file("llama2-tokenizer.model"))


def spawn(model_dir, *flags):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "openelm_mlx.chat", "--model", str(model_dir), *flags],
                          env=env, encoding="utf-8", timeout=120, dimensions=(50, 1000))
    child.expect(">> ")
    return child


def say(child, line: str) -> str:
    """Send a line; return what came back before the next prompt, without the echoed input."""
    child.sendline(line)
    child.expect(">> ")
    out = child.before.replace("\r\n", "\n")
    assert out.startswith(line + "\n"), out
    return out[len(line) + 1:]


def test_multi_turn_reset_system_and_exit(model_dir):
    model, tok = gen.load(model_dir)

    def expected(messages):
        return gen.generate(model, tok, tok.encode_chat(messages), max_tokens=8)

    child = spawn(model_dir, "-m", "8")
    first = [{"role": "user", "content": "Hello there"}]
    reply1 = expected(first)
    assert say(child, "Hello there") == reply1 + "\n"

    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "Tell me more"}]
    reply2 = expected(second)
    assert say(child, "Tell me more") == reply2 + "\n"

    assert "[conversation cleared]" in say(child, "/reset")
    assert say(child, "Hello there") == reply1 + "\n"  # the same as in a fresh conversation

    assert "[system prompt set]" in say(child, "/system Answer in one word.")
    with_system = [{"role": "system", "content": "Answer in one word."}, *first,
                   {"role": "assistant", "content": reply1}, {"role": "user", "content": "Why?"}]
    assert say(child, "Why?") == expected(with_system) + "\n"

    assert "[unknown command /nope]" in say(child, "/nope")
    child.sendline("7" * 3000)  # one token per digit: too long for the context (readline scrolls the echo)
    child.expect(">> ")
    assert "not sent" in child.before and "dropped" not in child.before
    assert say(child, "Why?") == expected(with_system + [{"role": "assistant", "content": expected(with_system)},
                                                         {"role": "user", "content": "Why?"}]) + "\n"
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_context_guard_drops_the_oldest_exchange(model_dir):
    model, tok = gen.load(model_dir)
    from openelm_mlx.chat import Conversation

    chat = Conversation(model, tok)
    warnings = []
    long = "word " * 600
    for _ in range(3):
        ids, max_tokens = chat.prompt_for(long, 256, 2048, warnings.append)
        chat.turns.append({"role": "assistant", "content": "ok"})
    assert any("dropped the oldest exchange" in w for w in warnings)
    assert len(ids) + max_tokens <= 2048 and chat.turns[0]["content"] == long
