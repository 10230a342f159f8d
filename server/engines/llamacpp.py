"""The ``llamacpp`` engine: a GGUF model served in process by llama.cpp (llama-cpp-python's C API).

A ``LocalEngine`` (``server/engines/base.py``): one worker thread owns the llama.cpp context and
runs rounds. In a round, cancelled requests are dropped, then each version in flight gets ONE
``llama_decode``: a ``llama_batch`` holding the next token of each of its decoding requests and
the prompts of its new requests, less the cells they reuse (prefill mixed into the decode step;
each request its own ``seq_id``). The context holds ``max_active + kv_resident`` sequences of up
to ``max_prompt_tokens + max_new_tokens`` tokens each (a non-unified KV cache: one stream per
sequence, so a sequence attends only to its own cells). KV reuse (``server/engines/kvreuse.py``):
a reply's prompt cells stay after it ends; the next turn of the conversation, a regeneration or
a new conversation with the same system prompt prefills only what no cached prefix of its
version holds. Chunks reach the event loop in one ``call_soon_threadsafe`` per
``stream_interval_s`` (40 ms), not one per token; a reply's first and last chunks go at once
(each wake-up of the loop thread takes a core from llama.cpp's compute threads).

Versions: ``base`` is the GGUF itself; every other version is a PEFT LoRA adapter folder,
converted once to a GGUF LoRA (``adapter.gguf`` next to it, by llama.cpp's
``convert_lora_to_gguf.py``: see ``server/engines/gguf.py``) and loaded with
``llama_adapter_lora_init`` on the worker (the swap pause). Before a version group is decoded
its adapter is set on the context (``llama_set_adapters_lora``), so a canary and live serve
side by side. A switch makes llama.cpp re-reserve its compute graph in the next decode (about
5-8 ms on 2 cores with SmolLM2-135M, against 11-15 ms for a decode step); the version already
set goes first in a round, so two versions in flight cost one switch per round.

Two formats, one per load (``single_streams``): llama.cpp's batched kernels do not cover the Q4_1
the default model ships in, so Q8_0 serves many replies at once best, while Q4_1 reads a third
fewer bytes per token and decodes one stream 1.16-1.25x faster. With ``single_streams`` > 0 the
engine holds both: a "batch" lane (``quant``, every load) and a "single" lane (``single_quant``,
the shipped file by default), each a model, a context, a KV book and a batch of its own. A reply
starts in the single lane when at most ``single_streams`` replies would be in flight with it
(``lane_for``); when more arrive, the single lane's replies move to the batch lane (``_migrate``:
their prompt and the tokens decoded so far are prefilled there, reusing what that lane caches,
and decoding goes on from the last position's logits), so a busy server runs one batched decode
per version per round again. A reply's text may therefore come from two formats when the load
rises while it streams; a lone greedy reply is the single format's, token for token.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feedback.records import BASE_VERSION
from server.engines.base import Chunk, EngineError, LocalEngine, Messages, Request, UnknownVersionError, fit_turns
from server.engines.gguf import (
    chat_template,
    convert_adapter,
    converter_dir,
    extra_buffers_usable,
    gguf_linear_shapes,
    requantize,
    route_llama_log,
    rslora_scale,
    token_piece,
    vocab_specials,
)
from server.engines.kvreuse import Entry, KvBook, Op, lane_for
from server.engines.sampling import sample

log = logging.getLogger("learnloop.engine.llamacpp")

SETTLE_CHUNK = 16
"""Reply tokens one idle settle prefills at a time: a request that arrives meanwhile waits for one
chunk at most (about 30 ms here, beside a 750-token system prompt), then reuses what was settled
(see ``kvreuse.py``)."""
SETTLE_AFTER_S = 0.05
"""Settling starts once the engine has had no request for this long: the end of a reply is often
followed at once by more (the replies of a burst end together, a client sends its next call), and
a customer who reads the reply gives it seconds."""


@dataclass(eq=False)
class _Request(Request):
    seq: int = -1  # llama.cpp sequence id while active
    n_past: int = 0  # tokens in this sequence's KV cells (reused ones included)
    fed: list[int] | None = None  # what the cells hold once prefilled: the prompt (or BOS for none)
    kv_ok: bool = True  # False after a failed decode: its cells are not kept for reuse
    prefilled: bool = False
    rng: Any = None
    started: bool = False  # its first chunk was posted (the first token is never held back)
    lane: _Lane | None = None  # where it decodes (``lane_for``; ``_migrate`` moves it)
    n_prompt: int = 0  # leading tokens of ``fed`` that are the prompt (the rest: reply tokens, after a move)


@dataclass(eq=False)
class _Lane:
    """One format of the model: its model, context, KV book and batch (see the module docstring)."""

    name: str  # "batch" (every load) or "single" (one or a few replies in flight)
    quant: str | None  # requantize the GGUF to this first (None: the file as it is)
    kv: KvBook
    path: str = ""  # the file served (set by ``_prepare``)
    extra_buffers: bool = True  # llama.cpp's AMX/repacked weights usable for this file
    model: Any = None
    ctx: Any = None
    batch: Any = None
    current: str | None = None  # adapter set on the context (None: none, the base model)
    tokens: int = 0  # tokens decoded in this lane
    settles: list[tuple[Entry, list[int]]] = field(default_factory=list)

    @property
    def n_seq(self) -> int:
        return self.kv.n_active + self.kv.n_resident


@dataclass
class _Adapter:
    handles: dict[str, Any]  # lane name -> llama_adapter_lora_p (one per model)
    path: str
    scale: float = 1.0


class LlamaCppEngine(LocalEngine[_Request]):
    """Serve a GGUF model in process with llama.cpp; versions are GGUF LoRA adapters."""

    worker_name = "llamacpp-worker"

    def __init__(
        self,
        gguf_path: str,
        *,
        quant: str | None = None,
        base_model_dir: str | None = None,
        cache_dir: Path | None = None,
        converter_src: str | None = None,
        sdist: str | None = None,
        extra_buffers: bool | None = None,
        max_prompt_tokens: int = 1536,
        max_new_tokens: int = 256,
        max_pending: int = 64,
        max_active: int = 16,
        system_prompt: str | None = None,
        n_threads: int | None = None,
        stream_interval_s: float = 0.04,
        kv_reuse: bool = True,
        kv_resident: int = 8,
        kv_settle: bool = True,
        flash_attn: bool | None = None,
        single_streams: int = 0,
        single_quant: str | None = None,
        single_resident: int = 2,
    ) -> None:
        super().__init__(_Request, max_prompt_tokens, max_pending, max_active, system_prompt)
        # the file served (after ``load``, the batch lane's: requantized when ``quant`` is set)
        self.gguf_path = gguf_path
        self.quant = quant  # requantize ``gguf_path`` to this type first (see ``requantize``)
        # at most this many replies in flight decode in the single lane, on ``single_quant`` (None:
        # the file as it is); 0, or the same format as ``quant``: one lane for every load
        self.single_streams = single_streams if single_quant != quant else 0
        self.single_quant = single_quant
        self.migrations = 0  # replies moved from the single lane to the batch lane
        # the LoRA converter: its --base (a transformers folder of the same model), and where the
        # converter comes from: ``converter_src`` (a llama.cpp checkout), else the llama-cpp-python
        # ``sdist`` extracted into ``cache_dir``, else an sdist fetched with pip (see ``converter_dir``)
        self.base_model_dir = base_model_dir
        self.cache_dir = cache_dir
        self.converter_src = converter_src
        self.sdist = sdist
        self.extra_buffers = extra_buffers  # llama.cpp's AMX/repacked weights; None: probe the CPU
        self.max_new_tokens = max_new_tokens  # sizes the context: a sequence holds prompt + this many tokens
        self.n_threads = n_threads or os.cpu_count() or 1
        # tokens after a reply's first are handed to the event loop at most this often (first and
        # last chunks at once): every wake-up of the loop takes a core from llama.cpp's threads
        self.stream_interval_s = stream_interval_s
        self.adapter_switches = 0  # llama_set_adapters_lora calls that changed the context's adapter
        self.adapter_switch_s = 0.0  # time in those calls; the real cost comes after (see the module docstring)
        self.conversions_s: list[float] = []  # adapter conversions to GGUF (in a thread, not on the worker)
        self.base_linear: dict[str, tuple[int, int]] = {}  # read from the GGUF's tensors by ``load``
        self.seq_capacity = 0  # tokens one sequence may hold (read back from the context)
        # KV reuse (server/engines/kvreuse.py): what each sequence's cells hold; ``kv_resident``
        # more sequences keep conversations and system prompts between replies
        self.kv = KvBook(max_active, kv_resident if kv_reuse else 0, enabled=kv_reuse)  # the batch lane's
        self.lanes = [_Lane("batch", quant, self.kv)]
        if self.single_streams:  # its own sequences: the replies it serves and ``single_resident`` parked ones
            book = KvBook(self.single_streams, single_resident if kv_reuse else 0, enabled=kv_reuse)
            self.lanes.append(_Lane("single", single_quant, book))
        self.kv_bytes_per_cell = 0  # read from the model by ``_open``
        # between replies, prefill each finished reply again over its decoded cells, so the next
        # turn prefills only the new message (``_idle``); the newest reply first
        self.kv_settle = kv_reuse and kv_settle
        self._reply_close: str | None = None  # what the template writes after a reply (``_load_template``)
        self._busy_at = 0.0  # the end of the last round (monotonic)
        # off by default with reuse: llama.cpp's flash attention switches to a tiled kernel at 64
        # query tokens, which rounds differently, so a reused prompt would change greedy replies
        self.flash_attn = (not kv_reuse) if flash_attn is None else flash_attn
        self._ll: Any = None  # the llama_cpp.llama_cpp module
        self._vocab: Any = None
        self._n_vocab = 0
        self._template: Any = None
        self._bos = ""
        self._eos = ""
        # one sequence's cells: llama.cpp pads to 256
        self._per_seq = -(-(max_prompt_tokens + max_new_tokens) // 256) * 256
        # a whole prompt always fits beside every decode token; with a single lane, a moved reply's
        # prompt and tokens so far (``_migrate``: at most a whole sequence)
        self._n_batch = (self._per_seq if self.single_streams else max_prompt_tokens) + max_active
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Chunk], Chunk]]] = {}
        self._urgent = False  # the outbox holds a first or a last chunk
        self._delivered_at = 0.0

    @property
    def _settles(self) -> list[tuple[Entry, list[int]]]:
        """Finished replies whose cells are not settled yet, every lane's."""
        return [s for lane in self.lanes for s in lane.settles]

    def _lane(self, name: str) -> _Lane | None:
        return next((lane for lane in self.lanes if lane.name == name), None)

    # --- life cycle -------------------------------------------------------------------------

    def _prepare(self) -> None:
        import llama_cpp.llama_cpp as ll

        route_llama_log(ll)
        self._ll = ll
        source = self.gguf_path
        for lane in self.lanes:
            lane.path = str(requantize(source, lane.quant)) if lane.quant else source
            usable = self.extra_buffers
            lane.extra_buffers = extra_buffers_usable(lane.path) if usable is None else usable
        self.gguf_path = self.lanes[0].path
        self.base_linear = gguf_linear_shapes(self.gguf_path)

    def _open(self) -> None:
        """Load each lane's model and create its context (on the worker, which owns them)."""
        ll = self._ll
        ll.llama_backend_init()
        for lane in self.lanes:
            self._open_lane(lane)
        model = self.lanes[0].model  # the lanes share the vocabulary and the template (one file, two formats)
        self._vocab = ll.llama_model_get_vocab(model)
        self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        # f16 K and V per layer: n_embd_k_gqa = n_embd_v_gqa = head size x KV heads
        head = ll.llama_model_n_embd(model) // ll.llama_model_n_head(model)
        kv_width = 2 * head * ll.llama_model_n_head_kv(model)
        self.kv_bytes_per_cell = 2 * kv_width * ll.llama_model_n_layer(model)
        self._load_template()
        self._is_eog = functools.partial(ll.llama_vocab_is_eog, self._vocab)  # a ctypes call returning a bool
        self._text = self.detokenize
        for lane in self.lanes:
            log.info(
                "%s lane: %s, %d sequences of %d tokens (%d resident; %.1f MiB of KV each), %d threads",
                lane.name,
                lane.path,
                lane.n_seq,
                self.seq_capacity,
                lane.kv.n_resident,
                self.seq_capacity * self.kv_bytes_per_cell / 2**20,
                self.n_threads,
            )
        if self.single_streams:
            log.info(
                "up to %d replies in flight decode in the single lane, more in the batch lane", self.single_streams
            )

    def _open_lane(self, lane: _Lane) -> None:
        ll = self._ll
        started = time.monotonic()
        mparams = ll.llama_model_default_params()
        mparams.use_extra_bufts = lane.extra_buffers  # AMX / repacked weights, where the CPU really runs them
        lane.model = ll.llama_model_load_from_file(lane.path.encode(), mparams)
        if not lane.model:
            raise EngineError(f"llama.cpp could not load {lane.path}")
        cparams = ll.llama_context_default_params()
        cparams.n_seq_max = lane.n_seq
        cparams.n_ctx = self._per_seq * lane.n_seq
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = min(512, cparams.n_batch)
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.flash_attn_type = int(self.flash_attn)  # LLAMA_FLASH_ATTN_TYPE_DISABLED (0) / _ENABLED (1)
        cparams.kv_unified = False  # one KV stream per sequence: attention never scans the others' cells
        cparams.no_perf = True
        lane.ctx = ll.llama_init_from_model(lane.model, cparams)
        if not lane.ctx:
            raise EngineError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.seq_capacity = int(ll.llama_n_ctx_seq(lane.ctx))
        lane.batch = ll.llama_batch_init(self._n_batch, 0, 1)
        log.debug("%s lane loaded in %.1f s", lane.name, time.monotonic() - started)

    def _free(self) -> None:
        ll = self._ll
        for lane in self.lanes:
            if lane.batch is not None:
                ll.llama_batch_free(lane.batch)
                lane.batch = None
            if lane.ctx:
                ll.llama_set_adapters_lora(lane.ctx, None, 0, None)
                lane.current = None
        for adapter in [*self._adapters.values(), *self._retired.values()]:
            for handle in adapter.handles.values():
                ll.llama_adapter_lora_free(handle)
        self._adapters.clear()
        self._retired.clear()
        for lane in self.lanes:
            if lane.ctx:
                ll.llama_free(lane.ctx)
                lane.ctx = None
            if lane.model:
                ll.llama_model_free(lane.model)
                lane.model = None

    # --- adapters ---------------------------------------------------------------------------

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return self.base_linear

    def adapter_refusal(self, config: dict[str, Any]) -> str | None:
        return "DoRA adapters cannot be served by llama.cpp" if config.get("use_dora") else None

    def convert_adapter(self, path: str | Path) -> Path:
        """The folder's ``adapter.gguf``, converted now unless it is current (blocking: seconds)."""
        if self.base_model_dir is None:
            raise EngineError("the llamacpp engine needs base_model_dir (a transformers folder) to convert adapters")
        converter = converter_dir(self.cache_dir, src=self.converter_src, sdist=self.sdist)
        return convert_adapter(path, self.base_model_dir, converter=converter)

    async def _prepare_adapter(self, path: str) -> tuple[str, float]:
        """The conversion to GGUF (once per folder) runs in a thread while decoding goes on; only
        ``llama_adapter_lora_init`` runs on the worker, between rounds."""
        started = time.monotonic()
        out = await asyncio.to_thread(self.convert_adapter, path)
        self.conversions_s.append(time.monotonic() - started)
        return str(out), rslora_scale(Path(path))

    def _attach(self, name: str, prepared: Any) -> _Adapter:
        """The adapter loaded into every lane's model (each format applies its own copy)."""
        gguf, scale = prepared
        handles: dict[str, Any] = {}
        for lane in self.lanes:
            handle = self._ll.llama_adapter_lora_init(lane.model, gguf.encode())
            if not handle:
                for done in handles.values():
                    self._ll.llama_adapter_lora_free(done)
                raise EngineError(f"llama.cpp refused the adapter {gguf} (does it fit {lane.path}?)")
            handles[lane.name] = handle
        return _Adapter(handles, gguf, scale)

    def _free_adapter(self, name: str, handle: Any) -> None:
        for lane in self.lanes:
            if lane.current == name:
                self._use(lane, BASE_VERSION)
            self._run(lane, lane.kv.drop_version(name))  # a version name may be loaded again, with other weights
        for lane_handle in handle.handles.values():
            self._ll.llama_adapter_lora_free(lane_handle)

    def _use(self, lane: _Lane, version: str) -> None:
        """Set the version's adapter on the lane's context (none for base) if another one is set."""
        target = None if version == BASE_VERSION else version
        if target == lane.current:
            return
        ll = self._ll
        started = time.perf_counter()
        if target is None:
            rc = ll.llama_set_adapters_lora(lane.ctx, None, 0, None)
        else:
            adapter = self._adapter(target)
            if adapter is None:
                raise UnknownVersionError(f"version {version!r} is not loaded")
            handles = (ll.llama_adapter_lora_p_ctypes * 1)(adapter.handles[lane.name])
            scales = (ctypes.c_float * 1)(adapter.scale)
            rc = ll.llama_set_adapters_lora(lane.ctx, handles, 1, scales)
        if rc != 0:
            raise EngineError(f"llama_set_adapters_lora failed ({rc}) for version {version!r}")
        lane.current = target
        self.adapter_switches += 1
        self.adapter_switch_s += time.perf_counter() - started

    # --- prompts -------------------------------------------------------------------------

    def _load_template(self) -> None:
        ll = self._ll
        raw = ll.llama_model_chat_template(self.lanes[0].model, None)
        self._template = chat_template(raw.decode() if raw else None)
        self._bos = self._piece(ll.llama_vocab_bos(self._vocab), special=True)
        self._eos = self._piece(ll.llama_vocab_eos(self._vocab), special=True)
        self.special_texts = vocab_specials(ll, self._vocab)  # message text never becomes one of these
        self._reply_close = reply_close(self.render, self._template, self._bos, self._eos)

    def _piece(self, token: int, *, special: bool) -> str:
        return token_piece(self._ll, self._vocab, token, special=special)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat as the model's template (from the GGUF) writes it, ready for the reply."""
        return str(
            self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos
            )
        )

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        n_max = len(raw) + 16
        buf = (self._ll.llama_token * n_max)()
        n = self._ll.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, False, True)
        if n < 0:
            raise EngineError(f"tokenizing failed ({n})")
        return list(buf[:n])

    def _render_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize(self.render(messages))

    def _prompt(self, messages: Messages) -> tuple[list[int], int]:
        """``prompt_ids`` and the length of its system turn (rendered alone, or a template's default one)."""
        msgs, ids = fit_turns(messages, self._render_ids, self.max_prompt_tokens, self.system_prompt)
        if len(ids) > self.max_prompt_tokens:
            return ids[-self.max_prompt_tokens :], 0
        head = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
        try:
            text = self._template.render(messages=head, add_generation_prompt=False, bos_token=self._bos)
        except Exception:  # a template that needs a user turn: no shared head
            return ids, 0
        prefix = self.tokenize(str(text))
        return ids, len(prefix) if len(prefix) < len(ids) and ids[: len(prefix)] == prefix else 0

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens left out); a trailing partial character shows as U+FFFD."""
        if not ids:
            return ""
        ll = self._ll
        tokens = (ll.llama_token * len(ids))(*ids)
        size = 8 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_detokenize(self._vocab, tokens, len(ids), buf, size, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 16

    # --- generation ------------------------------------------------------------------------

    def _activate(self, r: _Request) -> None:
        """The request's lane (``lane_for``: the single lane when few replies are in flight), then
        its slot there."""
        r.fed = r.prompt_ids or [max(self._ll.llama_vocab_bos(self._vocab), 0)]
        r.n_prompt = len(r.fed)
        single = self._lane("single")
        if single is None:
            self._place(r, self.lanes[0])
            return
        batch_active, single_active = len(self.lanes[0].kv.active), len(single.kv.active)
        with self._lock:  # admitted replies not decoding yet: queued, or still being tokenized
            waiting = max(0, self._pending - 1 - batch_active - single_active)
        name = lane_for(single_active, batch_active, waiting, self.single_streams)
        self._place(r, single if name == "single" else self.lanes[0])

    def _place(self, r: _Request, lane: _Lane) -> None:
        """A free slot of ``lane`` next to its version's others (``kvreuse.choose_slot``: each
        version's ids stay consecutive), with the longest cached prefix of what it will prefill."""
        plan = lane.kv.plan(r.version, r.fed or [])
        r.lane, r.seq, r.n_past = lane, plan.seq, plan.reuse
        self._run(lane, plan.ops)

    def _migrate(self, r: _Request, to: _Lane) -> None:
        """Move a reply to ``to``: its old cells stay there for reuse (the prompt's); ``to``
        prefills its prompt and the tokens decoded so far (the last one not fed yet) in the next
        round, reusing what it caches, and samples the next token from the last position."""
        old = r.lane
        assert old is not None and r.fed is not None
        self._run(old, old.kv.release(r.seq, r.version, self._kept_prompt(r)))
        r.fed = [*r.fed[: r.n_prompt], *r.generated]
        r.prefilled = False
        self._place(r, to)
        self.migrations += 1

    def _run(self, lane: _Lane, ops: list[Op]) -> None:
        """Carry out the KV book's ops on the lane's context (copies happen at the next ``llama_decode``)."""
        ll = self._ll
        mem = ll.llama_get_memory(lane.ctx)
        for op in ops:
            if op.kind == "copy":
                ll.llama_memory_seq_cp(mem, op.src, op.dst, -1, -1)
            elif not ll.llama_memory_seq_rm(mem, op.dst, op.n, -1):
                raise EngineError(f"llama.cpp could not trim sequence {op.dst} at {op.n}")

    def _round(self, active: list[_Request]) -> None:
        """One round: drop cancelled requests, move the single lane's replies to the batch lane
        if more replies are in flight than it takes, then one ``llama_decode`` per lane and version.

        A version's decode holds the next token of each of its decoding requests AND the whole
        prompt of its new requests (prefill mixed into the decode step), so eight customers who
        write at once get their first tokens from one forward pass instead of eight.
        """
        finished: list[_Request] = []
        live: list[_Request] = []
        for r in active:
            if r.cancel.is_set():
                self._post(r, Chunk("", "cancelled", len(r.generated)))
                finished.append(r)
            elif r.prefilled and r.n_past >= self.seq_capacity:  # the sequence is full
                self._post(r, Chunk(self._flush(r, final=True), "length", len(r.generated)))
                finished.append(r)
            else:
                live.append(r)
        single = self._lane("single")
        if single is not None and single.kv.active and len(live) > self.single_streams:
            for r in live:
                if r.lane is single:
                    self._migrate(r, self.lanes[0])
        groups: dict[tuple[str, str], list[_Request]] = {}
        for r in live:
            assert r.lane is not None
            groups.setdefault((r.lane.name, r.version), []).append(r)
        for lane in self.lanes:
            # the version set on the context goes first: one switch fewer per round
            versions = sorted(
                (v for name, v in groups if name == lane.name),
                key=lambda v: (None if v == BASE_VERSION else v) != lane.current,
            )
            for version in versions:
                group = groups[(lane.name, version)]
                try:
                    finished += self._step(lane, group)
                except Exception as exc:
                    finished += self._fail(group, exc, "batched decode")
        self._retire(active, finished)
        if self._urgent or time.monotonic() - self._delivered_at >= self.stream_interval_s:
            self._deliver()
        self._busy_at = time.monotonic()

    def _kept_prompt(self, r: _Request) -> list[int] | None:
        """What of the request's cells stays for reuse when it leaves its slot: the prompt's cells
        it holds (a reply's own were decoded by llama.cpp's vector kernels; they are settled, i.e.
        prefilled again, while the engine is idle: ``_idle``, kvreuse.py); None (nothing) after a
        failed decode or once its version is gone."""
        if not r.fed or not r.kv_ok or not self.has_version(r.version) or r.version in self._retired:
            return None
        return r.fed[: min(r.n_past, r.n_prompt)]

    def _release(self, r: _Request) -> None:
        """Free the request's slot; its cells stay for reuse, unless a decode failed or its version is gone."""
        lane = r.lane
        assert lane is not None
        prompt = self._kept_prompt(r)
        self._run(lane, lane.kv.release(r.seq, r.version, prompt))
        entry = lane.kv.entries.get(r.seq)
        if (
            prompt is not None
            and r.prefilled
            and entry is not None
            and self.kv_settle
            and self._reply_close is not None
        ):
            # the reply as the next turn's prompt renders it: its text as streamed, then the end of turn
            lane.settles.append((entry, self.tokenize(self._reply_text(r) + self._reply_close)))
            del lane.settles[: -lane.n_seq]  # never more than the cells kept
        r.seq = -1

    def _idle(self) -> float:
        """Settle the newest finished reply by one chunk (``kvreuse.py``) once the engine has been
        quiet for ``SETTLE_AFTER_S``; returns 0 after a chunk, else how long to sleep."""
        quiet = time.monotonic() - self._busy_at
        if self._settles and quiet < SETTLE_AFTER_S:
            return SETTLE_AFTER_S - quiet
        for lane in self.lanes:
            while lane.settles:
                entry, rest = lane.settles[-1]
                seq = lane.kv.seq_of(entry)
                if (
                    seq is None  # taken by a reply since, or evicted
                    or len(rest) < 2  # one token alone would go through the vector kernels
                    or not self.has_version(entry.version)
                    or entry.version in self._retired
                    or len(entry.tokens) + len(rest) > self.seq_capacity
                ):
                    lane.settles.pop()
                    continue
                chunk = rest if len(rest) < SETTLE_CHUNK + 2 else rest[:SETTLE_CHUNK]
                start = len(entry.tokens)
                try:
                    self._use(lane, entry.version)
                    self._run(lane, [Op("keep", seq, n=start)])  # the decoded cells of the reply go
                    for i, token in enumerate(chunk):
                        self._fill(lane.batch, i, token, start + i, seq, i == len(chunk) - 1)
                    lane.batch.n_tokens = len(chunk)
                    rc = self._ll.llama_decode(lane.ctx, lane.batch)
                    if rc != 0:
                        raise EngineError(f"llama_decode failed ({rc})")
                except Exception:
                    log.warning("settling a finished reply's cells failed: they are not reused", exc_info=True)
                    lane.settles.pop()
                    self._run(lane, lane.kv.drop(seq))
                    return 0.0
                lane.kv.extend(seq, chunk)
                if len(chunk) == len(rest):
                    lane.settles.pop()
                else:
                    lane.settles[-1] = (entry, rest[len(chunk) :])
                return 0.0
        return super()._idle()

    def _fail(self, group: list[_Request], exc: Exception, what: str) -> list[_Request]:
        for r in group:
            r.kv_ok = False  # what a failed decode left in its cells is not reused
        return super()._fail(group, exc, what)

    def _fill(self, batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _step(self, lane: _Lane, group: list[_Request]) -> list[_Request]:
        """One ``llama_decode`` for one version in one lane: a token for every decoding request plus
        the prompts of new (or moved) ones, as many as fit in the batch; the rest wait a round.
        Returns those finished.
        """
        self._use(lane, group[0].version)
        batch = lane.batch
        room = self._n_batch - sum(1 for r in group if r.prefilled)
        starting: list[_Request] = []
        for r in group:  # new requests in arrival order, as many as fit; the batch always fits one
            if not r.prefilled and r.fed is not None:
                if len(r.fed) - r.n_past > room:
                    break
                room -= len(r.fed) - r.n_past
                starting.append(r)
        # in sequence-id order: a non-unified KV cache puts only consecutive sequence ids in one
        # micro-batch, so any other order splits the step into one graph per sequence
        rows: list[tuple[_Request, int]] = []  # (request, batch index of its logits)
        n = 0
        for r in sorted(group, key=lambda r: r.seq):
            if r.prefilled:
                self._fill(batch, n, r.generated[-1], r.n_past, r.seq, True)
                n += 1
            elif r in starting and r.fed is not None:  # the prompt past its reused cells
                ids = r.fed[r.n_past :]
                for i, token in enumerate(ids):
                    self._fill(batch, n + i, token, r.n_past + i, r.seq, i == len(ids) - 1)
                n += len(ids)
            else:
                continue
            rows.append((r, n - 1))
        decoding = [r for r, _ in rows if r.prefilled]
        batch.n_tokens = n
        rc = self._ll.llama_decode(lane.ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed ({rc})")
        if decoding:
            self.stats.decode_steps += 1
        lane.tokens += len(rows)
        for r in decoding:
            r.n_past += 1
        for r in starting:
            if not r.generated:  # a moved reply was counted where it began
                self.stats.requests += 1
            r.n_past = len(r.fed or ())
            r.prefilled = True
            if r.prefix_len and r.fed:  # the system turn's cells, shared with later conversations
                self._run(lane, lane.kv.share_prefix(r.version, r.fed[: r.prefix_len], r.seq))
            if r.sampling.temperature > 0 and r.rng is None:
                r.rng = np.random.default_rng(r.sampling.seed)
        return [r for r, i in rows if self._accept(r, sample(self._logits(lane, i), r.sampling, r.rng))]

    def _post(self, r: _Request, chunk: Chunk) -> None:
        """Queue a chunk for the request's event loop; ``_deliver`` hands the queued chunks over at once."""
        self._outbox.setdefault(r.loop, []).append((r.chunks, chunk))
        if not r.started or chunk.finish_reason is not None:
            self._urgent = True
        r.started = True

    def _deliver(self) -> None:
        """One wake-up per event loop per round (not one per token): the loop thread competes for the
        same cores as llama.cpp's threads."""
        for loop, items in self._outbox.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)
        self._outbox.clear()
        self._urgent = False
        self._delivered_at = time.monotonic()

    def _logits(self, lane: _Lane, i: int) -> Any:
        """The logits of batch position ``i`` (a view on llama.cpp's buffer: use before the next decode)."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(lane.ctx, i), shape=(self._n_vocab,))


def reply_close(render: Any, template: Any, bos: str, eos: str) -> str | None:
    """What the chat template writes after an assistant's reply in the history (ChatML: the end of
    turn and a newline), found by rendering a probe chat with and without a reply; None when the
    history does not start with the prompt a reply was asked with (then nothing is settled)."""
    probe, mark = [{"role": "user", "content": "ping"}], "\u2063pong\u2063"
    try:
        asked = render(probe)
        after = str(
            template.render(
                messages=[*probe, {"role": "assistant", "content": mark}],
                add_generation_prompt=False,
                bos_token=bos,
                eos_token=eos,
            )
        )
    except Exception:
        return None
    if not after.startswith(asked + mark):
        return None
    return after[len(asked) + len(mark) :]


def _put_all(items: list[tuple[asyncio.Queue[Chunk], Chunk]]) -> None:
    for chunks, chunk in items:
        chunks.put_nowait(chunk)
