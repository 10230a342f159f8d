"""The transformers engine on a tiny random Llama: streaming, stop, versions, limits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.engines import (
    Chunk,
    EngineError,
    OverloadedError,
    SamplingConfig,
    TransformersEngine,
    UnknownVersionError,
    redirected,
)

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)
CHAT = [{"role": "user", "content": "What is your refund policy?"}]


def make_adapter(model_path: Path, out: Path, seed: int, scale: float = 20.0) -> Path:
    """A random r=4 LoRA on q_proj and v_proj, its weights ``scale`` times PEFT's random init (20:
    strong enough that the model writes gibberish)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft.save_pretrained(out)
    return out


@pytest.fixture
async def engine(tiny_model: Path) -> AsyncIterator[TransformersEngine]:
    e = TransformersEngine(str(tiny_model), dtype="float32", max_pending=3)
    await asyncio.to_thread(e.load)
    yield e
    await asyncio.to_thread(e.close)


async def collect(
    engine: TransformersEngine,
    version: str = "base",
    sampling: SamplingConfig = GREEDY,
    cancel: threading.Event | None = None,
) -> tuple[str, Chunk]:
    parts, last = [], None
    async for chunk in engine.stream(CHAT, version=version, sampling=sampling, cancel=cancel):
        parts.append(chunk.delta)
        last = chunk
    assert last is not None
    return "".join(parts), last


async def test_stream_finishes_with_reason_and_count(engine: TransformersEngine) -> None:
    text, last = await collect(engine)
    assert last.finish_reason in ("stop", "length") and 0 < last.n_tokens <= 12
    again, _ = await collect(engine)
    assert again == text  # greedy is deterministic


async def test_stop_cancels_within_a_step(engine: TransformersEngine) -> None:
    endless = SamplingConfig(max_new_tokens=10_000, temperature=0.0)  # greedy: the tiny model never picks EOS here
    cancel = threading.Event()
    cancel.set()  # the flag is checked before every step: a request cancelled up front makes no token
    _, last = await collect(engine, sampling=endless, cancel=cancel)
    assert (last.finish_reason, last.n_tokens) == ("cancelled", 0)
    cancel = threading.Event()
    chunks = []
    async for chunk in engine.stream(CHAT, version="base", sampling=endless, cancel=cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].n_tokens < 1000  # far from the 10,000 asked for: stopped mid-reply


async def test_versions_are_served_side_by_side(engine: TransformersEngine, tiny_model: Path, tmp_path: Path) -> None:
    base_alone, _ = await collect(engine)
    pause = await engine.load_adapter("v1", str(make_adapter(tiny_model, tmp_path / "v1", seed=1)))
    assert pause > 0
    v1_alone, _ = await collect(engine, "v1")
    assert v1_alone != base_alone
    # interleaved on the worker, each reply still comes from its own version
    both = await asyncio.gather(collect(engine, "base"), collect(engine, "v1"), collect(engine, "base"))
    assert [t for t, _ in both] == [base_alone, v1_alone, base_alone]
    with pytest.raises(EngineError, match="immutable"):
        await engine.load_adapter("v1", str(tmp_path / "v1"))
    with pytest.raises(UnknownVersionError):
        await collect(engine, "v7")
    await engine.load_adapter("v2", str(make_adapter(tiny_model, tmp_path / "v2", seed=2)))
    await engine.unload_adapter("v1")
    assert engine.versions == {"base", "v2"}
    assert (await collect(engine))[0] == base_alone


async def test_an_unloaded_version_finishes_its_running_and_queued_replies_then_is_freed(
    tiny_model: Path, tmp_path: Path
) -> None:
    e = TransformersEngine(str(tiny_model), dtype="float32", max_pending=8, max_active=1)
    await asyncio.to_thread(e.load)
    try:
        base_alone, _ = await collect(e)
        await e.load_adapter("v1", str(make_adapter(tiny_model, tmp_path / "v1", seed=1)))
        await e.load_adapter("v2", str(make_adapter(tiny_model, tmp_path / "v2", seed=2)))
        v1_alone, _ = await collect(e, "v1")
        running = e.stream(CHAT, version="v1", sampling=GREEDY)
        first = await running.__anext__()  # generating
        queued = e.stream(CHAT, version="v1", sampling=GREEDY)
        queued_first = asyncio.create_task(queued.__anext__())  # admitted, waiting: max_active is 1
        await asyncio.sleep(0)
        await e.unload_adapter("v1")
        assert e.versions == {"base", "v2"} and "v1" not in e.stats.unloaded  # no new reply, still held
        with pytest.raises(UnknownVersionError):
            await collect(e, "v1")
        assert first.delta + "".join([c.delta async for c in running]) == v1_alone
        assert (await queued_first).delta + "".join([c.delta async for c in queued]) == v1_alone
        for _ in range(200):  # freed by the worker once the last of them ended
            if "v1" in e.stats.unloaded:
                break
            await asyncio.sleep(0.01)
        assert e.stats.unloaded == {"v1": 3}  # every reply on v1 had ended when it was freed
        await e.unload_adapter("v2")  # the last adapter out: the plain model again
        assert e.stats.unloaded["v2"] == 0 and (await collect(e))[0] == base_alone
    finally:
        await asyncio.to_thread(e.close)


async def test_a_demoted_versions_queued_replies_start_on_the_version_that_replaced_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    """``redirect`` (what a rollback or promotion does to the engine): the reply decoding on v1
    ends on v1; the one queued behind it starts on v2, says so before its first text, writes
    v2's text, and v1's adapter is freed once its one remaining reply ended."""
    e = TransformersEngine(str(tiny_model), dtype="float32", max_pending=8, max_active=1)
    await asyncio.to_thread(e.load)
    try:
        await e.load_adapter("v1", str(make_adapter(tiny_model, tmp_path / "v1", seed=1)))
        await e.load_adapter("v2", str(make_adapter(tiny_model, tmp_path / "v2", seed=2)))
        v1_alone, _ = await collect(e, "v1")
        v2_alone, _ = await collect(e, "v2")
        assert v1_alone != v2_alone
        ended_on_v1 = e.stats.replies_ended["v1"]
        running = e.stream(CHAT, version="v1", sampling=GREEDY)
        first = await running.__anext__()  # decoding on v1
        queued = e.stream(CHAT, version="v1", sampling=GREEDY)
        queued_first = asyncio.create_task(queued.__anext__())  # admitted, waiting: max_active is 1
        await asyncio.sleep(0)
        e.redirect(["v1"], to="v2")
        later = e.stream(CHAT, version="v1", sampling=GREEDY)  # asked of v1 after its demotion: on purpose
        later_first = asyncio.create_task(later.__anext__())
        await asyncio.sleep(0)
        await e.unload_adapter("v1")
        rest = [c async for c in running]
        assert first.delta + "".join(c.delta for c in rest) == v1_alone
        assert {c.version for c in [first, *rest]} == {None}  # it began on v1 and ends there
        head = await queued_first
        tail = [c async for c in queued]
        # said in the first chunk, before any text: alone, or with the text a lagging reader's chunks
        # were joined into (stream_reply takes a chunk's version before its delta)
        assert head.version == "v2"
        assert head.delta + "".join(c.delta for c in tail) == v2_alone and {c.version for c in tail} == {None}
        stays = [await later_first, *[c async for c in later]]
        assert "".join(c.delta for c in stays) == v1_alone and {c.version for c in stays} == {None}
        for _ in range(200):
            if "v1" in e.stats.unloaded:
                break
            await asyncio.sleep(0.01)
        assert e.stats.unloaded == {"v1": ended_on_v1 + 2}  # the redirected reply no longer held v1
        # a redirect to a version no longer loaded moves nothing
        running = e.stream(CHAT, version="v2", sampling=GREEDY)
        first = await running.__anext__()
        queued = e.stream(CHAT, version="v2", sampling=GREEDY)
        queued_first = asyncio.create_task(queued.__anext__())
        await asyncio.sleep(0)
        e.redirect(["v2"], to="v1")
        assert first.delta + "".join([c.delta async for c in running]) == v2_alone
        stays = [await queued_first, *[c async for c in queued]]
        assert "".join(c.delta for c in stays) == v2_alone and {c.version for c in stays} == {None}
    finally:
        await asyncio.to_thread(e.close)


def test_redirects_are_followed_to_their_end() -> None:
    """Only replies asked before a demotion follow it."""
    assert redirected("v1", 0, {}) == "v1"
    assert redirected("v1", 5, {"v1": ("v2", 10), "v2": ("v3", 20)}) == "v3"  # demoted twice
    assert redirected("v1", 15, {"v1": ("v2", 10), "v2": ("v3", 20)}) == "v1"  # asked of v1 after its demotion
    assert redirected("v2", 15, {"v1": ("v2", 10), "v2": ("v3", 20)}) == "v3"
    assert redirected("v1", 5, {"v1": ("v2", 10), "v2": ("v1", 20)}) == "v2"  # a loop ends before it repeats
    assert redirected("v3", 0, {"v1": ("v2", 10)}) == "v3"


async def test_a_version_loaded_again_while_its_last_replies_run_keeps_its_adapter(
    tiny_model: Path, tmp_path: Path
) -> None:
    e = TransformersEngine(str(tiny_model), dtype="float32", max_pending=8, max_active=1)
    await asyncio.to_thread(e.load)
    try:
        base_alone, _ = await collect(e)
        path = str(make_adapter(tiny_model, tmp_path / "v1", seed=1))
        await e.load_adapter("v1", path)
        v1_alone, _ = await collect(e, "v1")
        assert v1_alone != base_alone
        running = e.stream(CHAT, version="v1", sampling=GREEDY)
        first = await running.__anext__()  # a reply on v1 streams
        await e.unload_adapter("v1")  # v1 leaves; its adapter waits for that reply
        await e.load_adapter("v1", path)  # ... and is promoted again before the reply ends
        assert first.delta + "".join([c.delta async for c in running]) == v1_alone
        for _ in range(20):  # let the worker run the rounds after the reply's end
            await asyncio.sleep(0.01)
        assert "v1" not in e.stats.unloaded  # the live v1's adapter was not freed under it
        assert (await collect(e, "v1"))[0] == v1_alone
        await e.unload_adapter("v1")
        assert e.stats.unloaded == {"v1": 3} and (await collect(e))[0] == base_alone
    finally:
        await asyncio.to_thread(e.close)


async def test_overload_is_refused_at_once(engine: TransformersEngine) -> None:
    long = SamplingConfig(max_new_tokens=10_000, temperature=1.0)
    cancels = [threading.Event() for _ in range(3)]
    streams = [engine.stream(CHAT, version="base", sampling=long, cancel=c) for c in cancels]
    firsts = await asyncio.gather(*(s.__anext__() for s in streams))
    assert all(isinstance(c, Chunk) for c in firsts)
    with pytest.raises(OverloadedError) as info:
        await collect(engine)
    assert info.value.retry_after > 0
    for c in cancels:
        c.set()
    for s in streams:
        async for _ in s:
            pass
    await collect(engine)  # capacity is back


async def test_prompt_trimming_keeps_system_and_last_turn(tiny_model: Path) -> None:
    e = TransformersEngine(str(tiny_model), dtype="float32", max_prompt_tokens=60, system_prompt="Be brief.")
    from transformers import AutoTokenizer

    e.tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    history = []
    for i in range(20):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last question"})
    ids = e.prompt_ids(history)
    text = e.tokenizer.decode(ids)
    assert len(ids) <= 60
    assert text.startswith("<|im_start|>system\nBe brief.") and "last question" in text and "question 0" not in text
    huge = [{"role": "user", "content": "refund " * 500}]
    assert len(e.prompt_ids(huge)) == 60


async def test_concurrent_replies_decode_as_one_batch_and_match_solo(engine: TransformersEngine) -> None:
    """Prompts of different lengths, greedy: batched replies are the replies each gets alone."""
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Tell me about refunds for orders that arrived damaged, please."}],
        [
            {"role": "user", "content": "Shipping?"},
            {"role": "assistant", "content": "3 days."},
            {"role": "user", "content": "And abroad?"},
        ],
    ]
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0)

    async def one(chat: list[dict[str, str]]) -> tuple[str, int]:
        parts, n = [], 0
        async for chunk in engine.stream(chat, version="base", sampling=sampling):
            parts.append(chunk.delta)
            n = chunk.n_tokens
        return "".join(parts), n

    solo = [await one(c) for c in chats]
    steps_before, tokens_before = engine.stats.decode_steps, engine.stats.tokens
    together = await asyncio.gather(*(one(c) for c in chats))
    assert list(together) == solo
    decode_tokens = engine.stats.tokens - tokens_before - len(chats)  # minus one token per prefill
    assert engine.stats.decode_steps - steps_before < decode_tokens  # steps were shared: a batch


async def test_close_ends_every_reply_and_commands_are_refused(tiny_model: Path) -> None:
    """A reply streaming (or queued) when the engine closes ends with an error chunk, not a hang."""
    e = TransformersEngine(str(tiny_model), dtype="float32", max_active=1)
    await asyncio.to_thread(e.load)
    endless = SamplingConfig(max_new_tokens=10_000, temperature=0.0)  # greedy: the tiny model never picks EOS here
    streams = [e.stream(CHAT, version="base", sampling=endless) for _ in range(2)]
    first = await streams[0].__anext__()
    queued = asyncio.ensure_future(streams[1].__anext__())  # waits behind max_active=1
    await asyncio.sleep(0.1)
    assert first.finish_reason is None and not queued.done()
    await asyncio.to_thread(e.close)
    last = [c async for c in streams[0]][-1]
    assert (last.finish_reason, last.error) == ("error", "EngineClosed") and last.n_tokens > 0
    assert ((await queued).finish_reason, (await queued).error) == ("error", "EngineClosed")
    with pytest.raises(EngineError, match="not running"):
        await e.load_adapter("v1", str(tiny_model))
    await e.aclose()  # nothing of a local engine lives on the loop: a no-op, but part of the protocol
