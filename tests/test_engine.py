"""The generation engine in-process (tiny model): batched answers equal `generate`, the queue bound, cancellation
(also a late cancel of a finished request, which must not touch the next one), stop strings split over tokens."""

import importlib
import queue
import time

import pytest

from conftest import shared_file
from openelm_mlx.engine import Engine, Overloaded, SamplingParams, Ticket

gen = importlib.import_module("openelm_mlx.generate")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from model_dirs import reference_model, save_tiny

    path = save_tiny(tmp_path_factory.mktemp("eng") / "tiny", reference_model(0),
                     shared_file("llama2-tokenizer.model"))
    return gen.load(path)


@pytest.fixture
def engine(loaded):
    model, tok = loaded
    eng = Engine(model, tok, max_batch=4, max_queue=1)
    yield eng
    eng.close()


def submit(engine, tok, prompt, **kw):
    events: queue.Queue = queue.Queue()
    return engine.submit(Ticket(tok.encode(prompt), SamplingParams(**kw), events.put)), events


def collect(events):
    text, parts = "", []
    while True:
        e = events.get(timeout=60)
        text += e.text
        parts.append(e.text)
        if e.finish_reason is not None:
            return text, e, parts


def test_batched_answers_equal_generate(engine, loaded):
    model, tok = loaded
    prompts = ["Once upon a time", "Hello there", "The capital of France is", "A"]
    pending = [submit(engine, tok, p, max_tokens=10)[1] for p in prompts]
    for p, events in zip(prompts, pending):
        text, e, _ = collect(events)
        assert text == gen.generate(model, tok, p, max_tokens=10)
        assert (e.finish_reason, e.completion_tokens, e.prompt_tokens) == ("length", 10, len(tok.encode(p)))
    assert engine.in_flight == 0


def test_queue_bound_and_cancel(engine, loaded):
    _, tok = loaded
    held = [submit(engine, tok, f"Story {i}:", max_tokens=2000) for i in range(5)]  # capacity 4 + 1
    with pytest.raises(Overloaded):
        submit(engine, tok, "one too many", max_tokens=4)
    for ticket, _ in held:
        engine.cancel(ticket)
    deadline = time.time() + 30
    while engine.in_flight and time.time() < deadline:
        time.sleep(0.05)
    text, e, _ = collect(submit(engine, tok, "after", max_tokens=3)[1])
    assert e.finish_reason == "length" and engine.in_flight == 0


def test_a_late_cancel_does_not_touch_the_next_request(engine, loaded):
    _, tok = loaded
    first, events = submit(engine, tok, "Hello", max_tokens=3)
    collect(events)
    second, events = submit(engine, tok, "Once upon a time", max_tokens=40)
    engine.cancel(first)  # a client closing after its answer: the lone-request slot is now the second's
    _, e, _ = collect(events)
    assert e.finish_reason == "length" and e.completion_tokens == 40


def test_stop_string_across_tokens_is_held_back(engine, loaded):
    model, tok = loaded
    full = gen.generate(model, tok, "Once upon a time", max_tokens=24)
    stop = full[9:14]
    text, e, parts = collect(submit(engine, tok, "Once upon a time", max_tokens=24, stop=(stop,))[1])
    assert text == full[:full.find(stop)] and e.finish_reason == "stop"
    assert all(stop not in "".join(parts[:i + 1]) for i in range(len(parts)))


def test_draft_model_serves_one_at_a_time_with_the_targets_greedy_output(loaded):
    model, tok = loaded
    eng = Engine(model, tok, draft_model=model, num_draft_tokens=3)
    try:
        pending = [submit(eng, tok, p, max_tokens=12)[1] for p in ("Once upon a time", "Hello there")]
        for p, events in zip(("Once upon a time", "Hello there"), pending):
            assert collect(events)[0] == gen.generate(model, tok, p, max_tokens=12)
    finally:
        eng.close()
