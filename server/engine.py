"""Generation engine: a local transformers model with PEFT LoRA adapters as model versions.

One worker thread owns the model and runs rounds. In a round, new requests are prefilled
(one forward each), then every request already decoding advances by one token: requests on
the same version decode together as one batch (continuous batching: requests join and leave
between rounds; the batch's KV cache is left-padded and rebuilt only when its membership
changes). So a long reply never holds back a short one, ``stop`` takes effect within one
step, and 8 sessions cost far less than 8 times one. Each request names the version it
generates with; the worker switches adapters only between version groups. Adapter loads run
on the worker between rounds (that is the swap pause, measured in ``stats.swap_pauses_s``);
replies that started on the old version finish on it, because the old adapter stays loaded.

The event loop never runs model code: it submits requests and receives ``Chunk``s
through an ``asyncio.Queue`` fed with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from feedback.exceptions import ErrorCode, LearnloopError
from feedback.records import BASE_VERSION

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


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None


class Engine(Protocol):
    """What the gateway and the app need from an engine (transformers, openai)."""

    stats: EngineStats

    def load(self) -> None: ...
    def close(self) -> None: ...
    def validate_adapter(self, path: str, sha256: str | None) -> None: ...
    def has_version(self, name: str) -> bool: ...
    @property
    def versions(self) -> set[str]: ...
    async def load_adapter(self, name: str, path: str) -> float: ...
    async def unload_adapter(self, name: str) -> None: ...
    def stream(
        self,
        messages: list[dict[str, str]],
        *,
        version: str,
        sampling: SamplingConfig,
        cancel: threading.Event | None = None,
    ) -> AsyncIterator[Chunk]: ...


@dataclass
class _Request:
    prompt_ids: list[int]
    version: str
    sampling: SamplingConfig
    emit: Callable[[Chunk], object]
    cancel: threading.Event = field(default_factory=threading.Event)
    past: Any = None
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    generator: Any = None
    cache_len: int = 0  # tokens in this request's KV cache


@dataclass
class _Batch:
    """Decode-phase requests of one version stepping together, and their shared padded cache."""

    version: str
    requests: list[_Request]
    cache: Any
    mask: Any  # [batch, cached tokens]: 1 for real tokens, 0 for left padding


@dataclass
class EngineStats:
    tokens: int = 0
    requests: int = 0
    decode_steps: int = 0  # forward passes in the decode phase (a batch counts once)
    swap_pauses_s: list[float] = field(default_factory=list)


def fit_prompt(
    messages: list[dict[str, str]],
    render: Callable[[list[dict[str, str]]], list[int]],
    max_tokens: int,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of the chat as ``render`` writes it, trimmed to ``max_tokens`` (every local engine).

    Rule: the system prompt (``system_prompt`` when the chat has none) and the last turn are
    always kept; whole older turns are dropped oldest first; if the last turn alone is too long,
    its start is cut.
    """
    msgs = list(messages)
    if system_prompt and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    ids = render(msgs)
    while len(ids) > max_tokens:
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            return ids[-max_tokens:]
        del msgs[first]
        ids = render(msgs)
    return ids


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


class TransformersEngine:
    """Serve a causal LM (any ``from_pretrained`` path or id) with versioned LoRA adapters."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_prompt_tokens: int = 1536,
        max_pending: int = 64,
        max_active: int = 16,
        system_prompt: str | None = None,
    ) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.max_prompt_tokens = max_prompt_tokens
        self.max_pending = max_pending  # generating + queued; past it, ``OverloadedError`` at once
        self.max_active = max_active  # generating at once (the batch); the rest wait in the queue
        self.system_prompt = system_prompt
        self.stats = EngineStats()
        self.model: Any = None
        self.tokenizer: Any = None
        self.base_linear: dict[str, tuple[int, int]] = {}  # linear layer -> (out, in), for adapter checks
        self._inbox: queue.Queue[_Request] = queue.Queue()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._adapters: set[str] = set()
        self._active_adapter: str | None = None  # the PEFT adapter set active
        self._adapters_off = False  # True while serving the base model through a PeftModel
        self._eos: set[int] = set()
        self._pending = 0
        self._pending_lock = threading.Lock()

    # --- life cycle (blocking; call from a thread) --------------------------------------

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        dtype = getattr(torch, self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model.eval()
        self.base_linear = {
            name: (m.out_features, m.in_features)
            for name, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self._thread = threading.Thread(target=self._worker, name="engine-worker", daemon=True)
        self._thread.start()
        log.info("loaded %s (%s) in %.1f s", self.model_path, self.dtype, time.monotonic() - started)

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- adapters (awaitable; run on the worker between decode steps) -------------------

    async def load_adapter(self, name: str, path: str) -> float:
        """Load a LoRA adapter as version ``name``; returns the seconds decoding paused."""
        return float(await self._call(lambda: self._load_adapter(name, path)))

    async def unload_adapter(self, name: str) -> None:
        await self._call(lambda: self._unload_adapter(name))

    def validate_adapter(self, path: str, sha256: str | None) -> None:
        """Refuse an adapter folder before loading: safetensors only, checksum, shapes (blocking I/O)."""
        from training.validate import check_fits, read_adapter_config

        folder = Path(path)
        check_fits(folder, read_adapter_config(folder, sha256=sha256), self.base_linear)

    def has_version(self, name: str) -> bool:
        return name == BASE_VERSION or name in self._adapters

    @property
    def versions(self) -> set[str]:
        return {BASE_VERSION, *self._adapters}

    async def _call(self, fn: Callable[[], Any]) -> Any:
        future: Future[Any] = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def _load_adapter(self, name: str, path: str) -> float:
        from peft import PeftModel

        started = time.monotonic()
        if name in self._adapters:
            raise EngineError(f"version {name!r} is already loaded; versions are immutable")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self._active_adapter = name
        self.model.eval()
        self._adapters.add(name)
        pause = time.monotonic() - started
        self.stats.swap_pauses_s.append(pause)
        log.info("adapter %s loaded from %s; decoding paused %.0f ms", name, path, pause * 1000)
        return pause

    def _unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            return
        if self._active_adapter == name:
            remaining = sorted(self._adapters - {name})
            if remaining:
                self.model.set_adapter(remaining[0])
                self._active_adapter = remaining[0]
        if len(self._adapters) > 1:
            self.model.delete_adapter(name)
            self._adapters.discard(name)
            log.info("adapter %s unloaded", name)

    def _use(self, version: str) -> None:
        target = None if version == BASE_VERSION else version
        if target is not None and target not in self._adapters:
            raise UnknownVersionError(f"version {version!r} is not loaded")
        current = None if self._adapters_off else self._active_adapter
        if not self._adapters or target == current:
            return
        if target is None:
            self.model.base_model.disable_adapter_layers()
            self._adapters_off = True
            return
        if self._adapters_off:
            self.model.base_model.enable_adapter_layers()
            self._adapters_off = False
        if target != self._active_adapter:
            self.model.set_adapter(target)
            self._active_adapter = target

    # --- prompts -------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Render the chat with the model's template, trimmed by ``fit_prompt``'s rule."""

        def render(ms: list[dict[str, str]]) -> list[int]:
            text = self.tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        return fit_prompt(messages, render, self.max_prompt_tokens, self.system_prompt)

    # --- generation ------------------------------------------------------------------------

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        version: str,
        sampling: SamplingConfig,
        cancel: threading.Event | None = None,
    ) -> AsyncIterator[Chunk]:
        """Stream a reply to ``messages`` from ``version``. Cancelling the iteration stops it."""
        if not self.has_version(version):
            raise UnknownVersionError(f"version {version!r} is not loaded")
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise OverloadedError(
                    f"{self._pending} replies generating or queued; limit {self.max_pending}", retry_after=1.0
                )
            self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            chunks: asyncio.Queue[Chunk] = asyncio.Queue()
            prompt_ids = await asyncio.to_thread(self.prompt_ids, messages)
            request = _Request(
                prompt_ids=prompt_ids,
                version=version,
                sampling=sampling,
                emit=lambda c: loop.call_soon_threadsafe(chunks.put_nowait, c),
                cancel=cancel or threading.Event(),
            )
            self._inbox.put(request)
            self._wake.set()
            try:
                while True:
                    chunk = await chunks.get()
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
            finally:
                request.cancel.set()
        finally:
            with self._pending_lock:
                self._pending -= 1

    def _worker(self) -> None:
        import torch

        active: list[_Request] = []
        batches: dict[str, _Batch] = {}
        with torch.inference_mode():
            while not self._stopping.is_set():
                run_commands(self._commands)
                while len(active) < self.max_active:
                    try:
                        active.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if not active:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._round(active, batches)

    def _round(self, active: list[_Request], batches: dict[str, _Batch]) -> None:
        """One round: drop cancelled requests, prefill new ones, one decode step for the rest."""
        finished: list[_Request] = []
        for r in active:
            if r.cancel.is_set():
                r.emit(Chunk("", "cancelled", len(r.generated)))
                finished.append(r)
        arriving: dict[str, list[_Request]] = {}
        for r in active:
            if r.past is None and r not in finished:
                arriving.setdefault(r.version, []).append(r)
        for group in arriving.values():
            if len(group) == 1:
                if not self._guarded(group[0], self._prefill):
                    finished.append(group[0])
                continue
            try:
                finished += self._prefill_batch(group)
            except Exception as exc:
                log.exception("batched prefill failed")
                for r in group:
                    r.emit(Chunk("", "error", 0, error=type(exc).__name__))
                finished += group
        decoding: dict[str, list[_Request]] = {}
        for r in active:
            if r not in finished and r.past is not None and r.generated:
                decoding.setdefault(r.version, []).append(r)
        for version in list(batches):
            if version not in decoding or batches[version].requests != decoding[version]:
                self._unbatch(batches.pop(version))
        for version, group in decoding.items():
            if len(group) == 1:
                if not self._guarded(group[0], self._decode_one):
                    finished.append(group[0])
                continue
            try:
                if version not in batches:
                    batches[version] = self._batch(version, group)
                finished += self._decode_batch(batches[version])
            except Exception as exc:
                log.exception("batched generation failed")
                batches.pop(version, None)
                for r in group:
                    r.emit(Chunk("", "error", len(r.generated), error=type(exc).__name__))
                finished += group
        for r in finished:
            if r in active:
                active.remove(r)
                r.past = None

    def _guarded(self, r: _Request, step: Callable[[_Request], bool]) -> bool:
        """Run one step for ``r``; False once it is finished (done, or failed with an error chunk)."""
        try:
            return not step(r)
        except Exception as exc:
            log.exception("generation failed")
            r.emit(Chunk("", "error", len(r.generated), error=type(exc).__name__))
            return False

    def _prefill(self, r: _Request) -> bool:
        import torch

        self._use(r.version)
        self.stats.requests += 1
        if r.sampling.seed is not None:
            r.generator = torch.Generator().manual_seed(r.sampling.seed)
        # logits_to_keep=1: the prefill computes the vocabulary projection for the last position only
        out = self.model(input_ids=torch.tensor([r.prompt_ids]), cache=None, use_cache=True, logits_to_keep=1)
        r.past, r.cache_len = out.cache, len(r.prompt_ids)
        return self._accept(r, self._sample(out.logits[0, -1].float(), r))

    def _prefill_batch(self, group: list[_Request]) -> list[_Request]:
        """Prefill requests of one version in one forward (prompts left-padded); returns those finished."""
        import torch

        self._use(group[0].version)
        longest = max(len(r.prompt_ids) for r in group)
        ids = torch.zeros((len(group), longest), dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids) :] = 1
            self.stats.requests += 1
            if r.sampling.seed is not None:
                r.generator = torch.Generator().manual_seed(r.sampling.seed)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=None,
            use_cache=True,
            logits_to_keep=1,
        )
        for r in group:
            r.past, r.cache_len = out.cache, len(r.prompt_ids)
        self._unbatch(_Batch(group[0].version, list(group), out.cache, mask))
        return [r for i, r in enumerate(group) if self._accept(r, self._sample(out.logits[i, -1].float(), r))]

    def _decode_one(self, r: _Request) -> bool:
        import torch

        self._use(r.version)
        out = self.model(input_ids=torch.tensor([[r.generated[-1]]]), cache=r.past, use_cache=True)
        self.stats.decode_steps += 1
        r.past = out.cache
        r.cache_len += 1
        return self._accept(r, self._sample(out.logits[0, -1].float(), r))

    def _batch(self, version: str, group: list[_Request]) -> _Batch:
        """Stack the requests' caches into one, left-padded to the longest."""
        import torch
        from transformers import DynamicCache

        longest = max(r.cache_len for r in group)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for i, r in enumerate(group):
            mask[i, longest - r.cache_len :] = 1
        cache = DynamicCache()
        for layer_idx in range(len(group[0].past.layers)):
            keys, values = [], []
            for r in group:
                layer = r.past.layers[layer_idx]
                pad = longest - r.cache_len
                keys.append(torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(layer.values, (0, 0, pad, 0)))
            cache.update(torch.cat(keys), torch.cat(values), layer_idx)
        for r in group:
            r.past = cache  # shared while batched; _unbatch gives each its own again
        return _Batch(version, list(group), cache, mask)

    def _unbatch(self, batch: _Batch) -> None:
        """Give every request still running its own cache back (its real, right-aligned part)."""
        from transformers import DynamicCache

        for i, r in enumerate(batch.requests):
            if r.past is not batch.cache:
                continue  # finished (its cache was dropped)
            own = DynamicCache()
            for layer_idx, layer in enumerate(batch.cache.layers):
                own.update(
                    layer.keys[i : i + 1, :, -r.cache_len :].clone(),
                    layer.values[i : i + 1, :, -r.cache_len :].clone(),
                    layer_idx,
                )
            r.past = own

    def _decode_batch(self, batch: _Batch) -> list[_Request]:
        """One decode step for every request of the batch; returns those that finished."""
        import torch

        self._use(batch.version)
        rows = batch.requests
        batch.mask = torch.cat([batch.mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=torch.tensor([[r.generated[-1]] for r in rows]),
            attention_mask=batch.mask,
            position_ids=torch.tensor([[r.cache_len] for r in rows]),
            cache=batch.cache,
            use_cache=True,
        )
        self.stats.decode_steps += 1
        batch.cache = out.cache
        finished = []
        for i, r in enumerate(rows):
            r.past = batch.cache
            r.cache_len += 1
            if self._accept(r, self._sample(out.logits[i, -1].float(), r)):
                finished.append(r)
        return finished

    def _accept(self, r: _Request, token: int) -> bool:
        """Take a sampled token: stream the new text; True when the reply is finished."""
        self.stats.tokens += 1
        if token in self._eos:
            r.emit(Chunk(self._flush(r, final=True), "stop", len(r.generated)))
            return True
        r.generated.append(token)
        if len(r.generated) >= r.sampling.max_new_tokens:
            r.emit(Chunk(self._flush(r, final=True), "length", len(r.generated)))
            return True
        delta = self._flush(r, final=False)
        if delta:
            r.emit(Chunk(delta))
        return False

    def _sample(self, logits: Any, r: _Request) -> int:
        import torch

        s = r.sampling
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < s.top_p
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=r.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _flush(self, r: _Request, *, final: bool) -> str:
        """New text since the last flush; holds back a trailing partial UTF-8 character."""
        text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[r.sent_chars :]
        r.sent_chars = len(text)
        return delta
