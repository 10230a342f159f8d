"""What every engine shares: the ``Engine`` protocol, chunks, sampling, errors, the prompt rule,
and ``LocalEngine``, the base of the two in-process engines (transformers, llama.cpp).

A local engine is one worker thread that owns the model and runs rounds; the event loop never
runs model code. ``stream`` admits a request (or refuses it at once with ``OverloadedError``),
renders and tokenizes its prompt in a thread, puts it in the worker's inbox and reads the
reply's ``Chunk``s from an ``asyncio.Queue`` that the worker feeds through
``call_soon_threadsafe``. Between rounds the worker runs the commands queued by ``_call``
(adapter loads and unloads: that is the swap pause) and takes new requests from the inbox, up
to ``max_active`` at once. A round is the subclass's: what it batches and how it samples is
what differs between engines. Versions: ``base`` is the model itself; every other version is
an adapter loaded under an immutable name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sized
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from feedback.exceptions import ErrorCode, LearnloopError
from feedback.records import BASE_VERSION
from feedback.specials import defuse

log = logging.getLogger("learnloop.engine")


class EngineError(LearnloopError):
    """Base class of engine errors."""


class OverloadedError(EngineError):
    """Too many requests queued; retry after ``retry_after`` seconds."""

    code = ErrorCode.OVERLOADED
    public = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)


class UnknownVersionError(EngineError):
    """The request names a version whose adapter is not loaded."""


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed reply. The last one has ``finish_reason`` set."""

    delta: str
    finish_reason: str | None = None  # "stop" (end of turn), "length", "cancelled", "error"
    n_tokens: int = 0
    error: str | None = None
    version: str | None = None  # set before any text when the reply starts on another version (``redirect``)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None


Messages = list[dict[str, str]]
"""A chat as engines take it: ``{"role": ..., "content": ...}`` turns, oldest first."""


@dataclass
class EngineStats:
    tokens: int = 0
    requests: int = 0
    decode_steps: int = 0  # forward passes in the decode phase (a batch counts once)
    swap_pauses_s: list[float] = field(default_factory=list)
    replies_ended: dict[str, int] = field(default_factory=dict)  # version -> replies ended on it (any reason)
    unloaded: dict[str, int] = field(default_factory=dict)  # version -> its replies_ended when its adapter was freed


class Engine(Protocol):
    """What the gateway and the app need from an engine (transformers, llamacpp, openai)."""

    stats: EngineStats

    def load(self) -> None: ...
    def close(self) -> None: ...
    async def aclose(self) -> None: ...
    def linear_shapes(self) -> dict[str, tuple[int, int]] | None:
        """Linear layer -> (out, in) an adapter must fit; {}: unknown (not checked); None: no model here."""
        ...

    def adapter_refusal(self, config: dict[str, Any]) -> str | None:
        """Why this engine cannot serve an adapter with this ``adapter_config.json``, or None."""
        ...

    def has_version(self, name: str) -> bool: ...
    @property
    def versions(self) -> set[str]: ...
    async def load_adapter(self, name: str, path: str) -> float: ...
    async def unload_adapter(self, name: str) -> None: ...
    def redirect(self, versions: Iterable[str], to: str) -> None:
        """Replies asked of ``versions`` that have not started yet start on ``to`` instead (their
        first chunk says so in ``Chunk.version``); replies already decoding end where they began."""
        ...

    def stream(
        self, messages: Messages, *, version: str, sampling: SamplingConfig, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]: ...


def redirected(version: str, asked: int, redirects: Mapping[str, tuple[str, int]]) -> str:
    """The version a reply asked of ``version`` (the engine's ``asked``-th request) starts on.

    ``redirects``: demoted version -> (where its replies go, the count of requests asked when it
    was demoted); only a reply asked before a demotion follows it, to its end (a version demoted
    twice goes where the second demotion sent its replies; a loop ends where it would repeat). A
    reply asked of a demoted version afterwards was asked of it on purpose (a test, a probe).
    """
    seen = {version}
    while version in redirects:
        to, upto = redirects[version]
        if asked >= upto or to in seen:
            break
        version = to
        seen.add(version)
    return version


Rendered = TypeVar("Rendered", bound=Sized)


def fit_turns(
    messages: Messages,
    render: Callable[[Messages], Rendered],
    max_size: int,
    system_prompt: str | None = None,
) -> tuple[Messages, Rendered]:
    """The turns kept and their rendering: the system prompt (``system_prompt`` when the chat has
    none) and the last turn always, older turns dropped oldest first while ``len(render(...))``
    exceeds ``max_size``. The rendering may still exceed it when the last turn alone does.
    """
    msgs = list(messages)
    if system_prompt and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    rendered = render(msgs)
    while len(rendered) > max_size:
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            break
        del msgs[first]
        rendered = render(msgs)
    return msgs, rendered


def fit_prompt(
    messages: Messages,
    render: Callable[[Messages], list[int]],
    max_tokens: int,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of the chat as ``render`` writes it, trimmed to ``max_tokens`` (every engine).

    Rule (``fit_turns``): the system prompt (``system_prompt`` when the chat has none) and the
    last turn are always kept; whole older turns are dropped oldest first; if the last turn alone
    is too long, its start is cut.
    """
    _, ids = fit_turns(messages, render, max_tokens, system_prompt)
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def run_commands(commands: queue.Queue[tuple[Callable[[], Any], Future[Any]]]) -> None:
    """Run the commands queued for an engine's worker thread (between rounds) and settle their futures."""
    while True:
        try:
            fn, future = commands.get_nowait()
        except queue.Empty:
            return
        try:
            future.set_result(fn())
        except Exception as exc:
            log.exception("engine command failed")
            future.set_exception(exc)


@dataclass(eq=False)  # compared by identity: two requests are never the same one
class Request:
    """One reply in a local engine; each engine's request adds its decoding state."""

    prompt_ids: list[int]
    version: str
    sampling: SamplingConfig
    loop: asyncio.AbstractEventLoop  # the caller's loop: chunks go to ``chunks`` through it
    chunks: asyncio.Queue[Chunk]
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    asked: int = 0  # the engine's count of requests submitted before this one (see ``redirect``)
    prefix_len: int = 0  # leading prompt tokens that are the rendered system turn (shared by conversations)


R = TypeVar("R", bound=Request)


class LocalEngine(Generic[R]):
    """The worker thread, admission, commands, adapter slots and the chunk stream of a local engine.

    A subclass implements what differs: ``_open``/``_free`` (the model, on the worker),
    ``_round`` (one round over the active requests), ``_attach``/``_free_adapter`` (one
    adapter), ``_render_ids`` (the chat as token ids), ``_post`` (hand a chunk to the event
    loop), and sets ``_is_eog`` and ``_text`` when it opens the model.
    An unloaded version takes no new reply, and its adapter is freed once the last reply admitted
    on it (queued ones too) has ended (``stats.unloaded``): a reply ends on the version it began on.
    """

    worker_name = "engine-worker"

    def __init__(
        self,
        request_type: type[R],
        max_prompt_tokens: int,
        max_pending: int,
        max_active: int,
        system_prompt: str | None,
        /,
    ) -> None:
        """The subclass's request type, then the limits its constructor documents."""
        self.max_prompt_tokens = max_prompt_tokens
        self.max_pending = max_pending  # generating + queued; past it, ``OverloadedError`` at once
        self.max_active = max_active  # generating at once (the batch); the rest wait in the queue
        self.system_prompt = system_prompt
        self.stats = EngineStats()
        self._request_type = request_type
        self._inbox: queue.Queue[R] = queue.Queue()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._adapters: dict[str, Any] = {}  # version -> the engine's handle on its adapter (loaded, routable)
        self._retired: dict[str, Any] = {}  # unloaded (no new reply starts on it), freed once no reply uses it
        self._users: dict[str, int] = {}  # version -> requests admitted and not finished
        self._redirects: dict[str, tuple[str, int]] = {}  # demoted version -> (its queued replies' new version, asked)
        self._asked = 0  # requests submitted so far: a redirect reaches those asked before it
        self._pending = 0
        self._lock = threading.Lock()
        # per token, the worker calls these directly (bound C callables where the engine has them:
        # no extra Python frame): is this token an end of generation; the text of these ids
        self._is_eog: Callable[[int], bool] = lambda token: False
        self._text: Callable[[list[int]], str] = lambda ids: ""
        # the tokenizer's special-token strings (set when the model opens): message text never becomes them
        self.special_texts: tuple[str, ...] = ()

    # --- life cycle (blocking; call from a thread) --------------------------------------

    def load(self) -> None:
        """Open the model on a new worker thread; raises what opening it raised."""
        self._prepare()
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._worker, args=(ready,), name=self.worker_name, daemon=True)
        self._thread.start()
        ready.result()

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    async def aclose(self) -> None:
        """Nothing of a local engine lives on the event loop: ``close`` stopped it all."""

    def _prepare(self) -> None:
        """Work before the worker starts, on the caller's thread (default: none)."""

    def _open(self) -> None:
        """Load the model (on the worker, which owns it)."""
        raise NotImplementedError

    def _free(self) -> None:
        """Free what ``_open`` made, also after it failed half way (on the worker; default: nothing)."""

    def _worker_context(self) -> contextlib.AbstractContextManager[Any]:
        """Held by the worker while it runs rounds (default: nothing)."""
        return contextlib.nullcontext()

    # --- adapters (awaitable; loaded and unloaded on the worker between rounds) ----------

    def linear_shapes(self) -> dict[str, tuple[int, int]] | None:
        raise NotImplementedError

    def adapter_refusal(self, config: dict[str, Any]) -> str | None:
        return None

    def has_version(self, name: str) -> bool:
        return name == BASE_VERSION or name in self._adapters

    @property
    def versions(self) -> set[str]:
        return {BASE_VERSION, *self._adapters}

    async def load_adapter(self, name: str, path: str) -> float:
        """Load the adapter folder ``path`` as version ``name``; returns the seconds decoding paused."""
        if name in self._adapters:
            raise EngineError(f"version {name!r} is already loaded; versions are immutable")
        prepared = await self._prepare_adapter(path)
        return float(await self._call(lambda: self._load_adapter(name, path, prepared)))

    async def unload_adapter(self, name: str) -> None:
        """No new reply starts on ``name`` from now; its adapter is freed once its last reply ends."""
        await self._call(lambda: self._unload_adapter(name))

    def redirect(self, versions: Iterable[str], to: str) -> None:
        """Replies queued on ``versions`` start on ``to`` when the worker takes them up (see
        ``_take_up``); ``to`` itself takes its own replies again (a rollback to it)."""
        with self._lock:
            for name in versions:
                if name != to and name not in self._redirects:  # the first demotion reached all its replies
                    self._redirects[name] = (to, self._asked)
            self._redirects.pop(to, None)

    def _take_up(self, r: R) -> None:
        """A queued request leaves the inbox: on the version its demotions lead to, if that one is
        loaded (checked and counted under the lock, as ``stream`` does), else on its own."""
        with self._lock:
            to = redirected(r.version, r.asked, self._redirects)
            if to == r.version or not self.has_version(to):
                return
            self._users[r.version] -= 1
            self._users[to] = self._users.get(to, 0) + 1
            r.version = to
        self._post(r, Chunk("", version=to))

    async def _prepare_adapter(self, path: str) -> Any:
        """What ``_attach`` needs, made while decoding goes on (default: the folder itself)."""
        return path

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._thread is None:
            raise EngineError("the engine is not running")
        future: Future[Any] = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def _load_adapter(self, name: str, path: str, prepared: Any) -> float:
        started = time.monotonic()
        if name in self._adapters:
            raise EngineError(f"version {name!r} is already loaded; versions are immutable")
        self._adapters[name] = self._retired.pop(name, None) or self._attach(name, prepared)  # see _unload_adapter
        with self._lock:
            self._redirects.pop(name, None)  # routed again: it takes its own replies
        pause = time.monotonic() - started
        self.stats.swap_pauses_s.append(pause)
        log.info("adapter %s loaded from %s; decoding paused %.0f ms", name, path, pause * 1000)
        return pause

    def _attach(self, name: str, prepared: Any) -> Any:
        """Load one adapter into the model (on the worker); returns the handle kept for it."""
        raise NotImplementedError

    def _unload_adapter(self, name: str) -> None:
        with self._lock:  # ``stream`` checks the version and counts its user under the same lock
            handle = self._adapters.pop(name, None)
        if handle is not None:
            self._retired[name] = handle  # promoted again before freed: ``_load_adapter`` takes it back (same weights)
            self._free_retired()

    def _free_retired(self) -> None:
        """Free the unloaded adapters that no admitted reply uses any more (on the worker)."""
        for name in list(self._retired):
            if self._users.get(name, 0) > 0:  # only falls: no reply joins once it left ``_adapters`` (locked)
                continue
            self._free_adapter(name, self._retired.pop(name))
            self.stats.unloaded[name] = self.stats.replies_ended.get(name, 0)
            log.info("adapter %s unloaded", name)

    def _adapter(self, name: str) -> Any:
        """The handle of a loaded adapter, or of an unloaded one replies still use; else None."""
        return self._adapters.get(name, self._retired.get(name))

    def _free_adapter(self, name: str, handle: Any) -> None:
        raise NotImplementedError  # free one adapter no request uses any more (on the worker)

    # --- prompts -------------------------------------------------------------------------

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Render the chat with the model's template, trimmed by ``fit_prompt``'s rule.

        Message text is defused first (``feedback.specials``): a special token written in a
        message stays text and never opens a turn of its own.
        """
        safe = [{"role": m["role"], "content": defuse(m["content"], self.special_texts)} for m in messages]
        return fit_prompt(safe, self._render_ids, self.max_prompt_tokens, self.system_prompt)

    def _prompt(self, messages: Messages) -> tuple[list[int], int]:
        """``prompt_ids`` and how many of them are the system turn (default: 0, not told apart)."""
        return self.prompt_ids(messages), 0

    def _render_ids(self, messages: Messages) -> list[int]:
        raise NotImplementedError

    # --- generation ------------------------------------------------------------------------

    async def stream(
        self, messages: Messages, *, version: str, sampling: SamplingConfig, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]:
        """Stream a reply to ``messages`` from ``version``. Cancelling the iteration stops it."""
        with self._lock:
            if not self.has_version(version):  # checked under the lock: an unload cannot free it under us
                raise UnknownVersionError(f"version {version!r} is not loaded")
            if self._pending >= self.max_pending:
                raise OverloadedError(
                    f"{self._pending} replies generating or queued; limit {self.max_pending}", retry_after=1.0
                )
            self._pending += 1
            self._users[version] = self._users.get(version, 0) + 1  # keeps the adapter until the reply ends
            asked = self._asked
            self._asked += 1
        submitted = False
        try:
            chunks: asyncio.Queue[Chunk] = asyncio.Queue()
            prompt_ids, prefix_len = await asyncio.to_thread(self._prompt, messages)
            request = self._request_type(
                prompt_ids=prompt_ids,
                prefix_len=prefix_len,
                version=version,
                asked=asked,
                sampling=sampling,
                loop=asyncio.get_running_loop(),
                chunks=chunks,
                cancel=cancel or threading.Event(),
            )
            self._inbox.put(request)
            submitted = True  # from here on the worker releases the version when the request ends
            self._wake.set()
            try:
                while True:
                    chunk = await chunks.get()
                    while chunk.finish_reason is None and not chunks.empty():  # the reader lagged: one piece
                        more = chunks.get_nowait()
                        chunk = Chunk(
                            chunk.delta + more.delta,
                            more.finish_reason,
                            more.n_tokens,
                            more.error,
                            more.version or chunk.version,
                        )
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
            finally:
                request.cancel.set()
        finally:
            with self._lock:
                self._pending -= 1
                if not submitted:
                    self._users[version] -= 1

    def _worker(self, ready: Future[None]) -> None:
        try:
            self._open()
        except Exception as exc:
            self._free()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        active: list[R] = []
        try:
            with self._worker_context():
                while not self._stopping.is_set():
                    run_commands(self._commands)
                    self._free_retired()  # unloaded adapters whose last reply ended in the last round
                    while len(active) < self.max_active:
                        try:
                            r = self._inbox.get_nowait()
                        except queue.Empty:
                            break
                        self._take_up(r)
                        self._activate(r)
                        active.append(r)
                    if not active:
                        wait = self._idle()
                        if wait <= 0:
                            continue  # did a piece of idle work: look for new requests first
                        self._wake.wait(timeout=wait)
                        self._wake.clear()
                        continue
                    self._round(active)
        finally:
            for r in active:
                self._post(r, Chunk("", "error", len(r.generated), error="EngineClosed"))
            while True:
                try:
                    self._post(self._inbox.get_nowait(), Chunk("", "error", 0, error="EngineClosed"))
                except queue.Empty:
                    break
            self._deliver()
            self._free()

    def _activate(self, r: R) -> None:
        """A request leaves the inbox to join the rounds (default: nothing to set up)."""

    def _idle(self) -> float:
        """No request in flight or waiting: do one short piece of background work and return 0, or
        return how long the worker may sleep (until a request wakes it) before asking again."""
        return 0.5

    def _round(self, active: list[R]) -> None:
        """One round over the active requests; finished ones go through ``_retire``."""
        raise NotImplementedError

    def _retire(self, active: list[R], finished: list[R]) -> None:
        """Take finished requests out of the rounds; their version is no longer held by them."""
        for r in finished:
            if r in active:
                active.remove(r)
                self._release(r)
                with self._lock:
                    self._users[r.version] -= 1
                self.stats.replies_ended[r.version] = self.stats.replies_ended.get(r.version, 0) + 1

    def _release(self, r: R) -> None:
        """Free what a finished request held in the model (default: nothing)."""

    def _fail(self, group: list[R], exc: Exception, what: str) -> list[R]:
        """End every request of ``group`` with an error chunk after ``what`` failed; returns the group."""
        log.exception("%s failed", what)
        for r in group:
            self._post(r, Chunk("", "error", len(r.generated), error=type(exc).__name__))
        return group

    def _post(self, r: R, chunk: Chunk) -> None:
        """Hand ``chunk`` to the request's event loop (now, or by the next ``_deliver``)."""
        raise NotImplementedError

    def _deliver(self) -> None:
        """Hand over the chunks ``_post`` held back (default: it holds none)."""

    def _accept(self, r: R, token: int) -> bool:
        """Take a sampled token: stream the new text; True when the reply is finished."""
        self.stats.tokens += 1
        if self._is_eog(token):
            self._post(r, Chunk(self._flush(r, final=True), "stop", len(r.generated)))
            return True
        r.generated.append(token)
        if len(r.generated) >= r.sampling.max_new_tokens:
            self._post(r, Chunk(self._flush(r, final=True), "length", len(r.generated)))
            return True
        delta = self._flush(r, final=False)
        if delta:
            self._post(r, Chunk(delta))
        return False

    def _reply_text(self, r: R) -> str:
        """The reply so far as it streams and is stored: a NUL the model writes is dropped (it means
        nothing in a chat, and PostgreSQL's text cannot hold it)."""
        return self._text(r.generated).replace("\x00", "")

    def _flush(self, r: R, *, final: bool) -> str:
        """New text since the last flush (``_reply_text``); holds back a trailing partial UTF-8 character."""
        text = self._reply_text(r)
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[r.sent_chars :]
        r.sent_chars = len(text)
        return delta
