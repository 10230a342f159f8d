"""The ``llamacpp`` engine: a GGUF model served in process by llama.cpp (llama-cpp-python's C API).

Same shape as the transformers engine (``server/engine.py``): one worker thread owns the
llama.cpp context and runs rounds. In a round, cancelled requests are dropped, then each
version in flight gets ONE ``llama_decode``: a ``llama_batch`` holding the next token of each
of its decoding requests and the whole prompts of its new requests (prefill mixed into the
decode step; each request its own ``seq_id``). Requests join and leave between rounds; a
finished request's KV cells are freed with ``llama_memory_seq_rm``. The context holds
``max_active`` sequences of up to ``max_prompt_tokens + max_new_tokens`` tokens each (a
non-unified KV cache: one stream per sequence, so a sequence attends only to its own cells).
Chunks reach the event loop in one ``call_soon_threadsafe`` per ``stream_interval_s`` (40 ms:
a reader sees 25 updates a second), not one per token; a reply's first and last chunks go at
once. Each wake-up of the loop thread takes a core from llama.cpp's two compute threads, whose
barriers then wait for it. A reader that lags gets the pieces it missed as one chunk.

Versions: ``base`` is the GGUF itself; every other version is a PEFT LoRA adapter folder,
converted once to a GGUF LoRA (``adapter.gguf`` next to it, by llama.cpp's
``convert_lora_to_gguf.py``) and loaded with ``llama_adapter_lora_init`` on the worker (the
swap pause). Before a version group is decoded its adapter is set on the context
(``llama_set_adapters_lora``), so a canary and live serve side by side in one process. A switch
returns at once (0.1 ms), but it makes llama.cpp re-reserve its compute graph in the next
``llama_decode``: about 5-8 ms on 2 cores with SmolLM2-135M, against 11-15 ms for a decode
step. The version already set goes first in a round, so two versions in flight cost one switch
per round (counted in ``adapter_switches``).

The event loop never runs model code: it submits requests and receives ``Chunk``s through an
``asyncio.Queue`` fed with ``call_soon_threadsafe``. Tokenizing a prompt runs in a thread
(``asyncio.to_thread``): llama.cpp's tokenizer only reads the vocabulary.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import json
import logging
import math
import os
import queue
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feedback.records import BASE_VERSION
from server.engine import (
    Chunk,
    EngineError,
    EngineStats,
    OverloadedError,
    SamplingConfig,
    UnknownVersionError,
    fit_prompt,
    run_commands,
)

log = logging.getLogger("learnloop.engine.llamacpp")

ADAPTER_GGUF = "adapter.gguf"
"""Name of the converted adapter, written next to ``adapter_model.safetensors``."""

_TOP_CANDIDATES = 256  # top-p looks at this many most likely tokens first (full sort only if they fall short)


def llama_cpp_available() -> bool:
    """True when llama-cpp-python imports (its shared library loads)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


# --- the LoRA converter (llama.cpp's convert_lora_to_gguf.py, from the llama-cpp-python sdist) ---


def _llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def converter_dir(cache_dir: Path | None = None) -> Path:
    """A folder holding ``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py/`` (extracted once).

    ``$LEARNLOOP_LLAMA_CPP_SRC`` (a llama.cpp checkout) wins; else the cache folder
    ``<cache>/llama.cpp/<llama-cpp-python version>``, extracted from the llama-cpp-python sdist of
    the installed version: ``$LEARNLOOP_LLAMA_SDIST`` if set, else fetched with ``pip download``.
    The converter must match the installed llama.cpp (the GGUF LoRA format follows it).
    """
    if env := os.environ.get("LEARNLOOP_LLAMA_CPP_SRC"):
        folder = Path(env)
        if not (folder / "convert_lora_to_gguf.py").is_file():
            raise EngineError(f"$LEARNLOOP_LLAMA_CPP_SRC={env} holds no convert_lora_to_gguf.py")
        return folder
    from training.models import default_cache_dir

    ver = _llama_cpp_version()
    dest = (cache_dir or default_cache_dir()) / "llama.cpp" / ver
    if (dest / "convert_lora_to_gguf.py").is_file() and (dest / "gguf-py").is_dir():
        return dest
    sdist = os.environ.get("LEARNLOOP_LLAMA_SDIST")
    downloads = dest.parent / "downloads"
    if not sdist:
        found = sorted(downloads.glob(f"llama_cpp_python-{ver}.tar.gz"))
        if not found:
            downloads.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            cmd += ["-d", str(downloads), f"llama-cpp-python=={ver}"]
            log.info("fetching the llama-cpp-python %s sdist for its LoRA converter", ver)
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                raise EngineError(f"`{' '.join(cmd)}` failed; set $LEARNLOOP_LLAMA_SDIST to the sdist")
            found = sorted(downloads.glob(f"llama_cpp_python-{ver}.tar.gz"))
            if not found:
                raise EngineError(f"pip reported success but no llama-cpp-python sdist is in {downloads}")
        sdist = str(found[0])
    _extract_converter(Path(sdist), dest)
    return dest


def _extract_converter(sdist: Path, dest: Path) -> None:
    staging = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # <sdist>/vendor/llama.cpp/{convert_lora_to_gguf.py, conversion/..., gguf-py/...}
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            rest = parts[3:]
            if rest[0] not in ("convert_lora_to_gguf.py", "conversion", "gguf-py") or not member.isfile():
                continue
            member.name = "/".join(rest)
            tar.extract(member, staging, filter="data")
    if not (staging / "convert_lora_to_gguf.py").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise EngineError(f"{sdist} holds no vendor/llama.cpp/convert_lora_to_gguf.py")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def _conversion_record(folder: Path) -> Path:
    return folder / f"{ADAPTER_GGUF}.json"


def converted_adapter_ok(folder: Path) -> bool:
    """True when ``adapter.gguf`` is the conversion of the folder's current weights, byte for byte.

    The conversion writes ``adapter.gguf.json`` with the SHA-256 of the safetensors it read and of
    the GGUF it wrote; a GGUF that was replaced, or that belongs to other weights, is not reused.
    """
    from training.validate import sha256_file

    out, weights = folder / ADAPTER_GGUF, folder / "adapter_model.safetensors"
    try:
        record = json.loads(_conversion_record(folder).read_text())
        return bool(
            out.is_file()
            and weights.is_file()
            and record.get("source_sha256") == sha256_file(weights)
            and record.get("sha256") == sha256_file(out)
        )
    except (OSError, ValueError, AttributeError):
        return False


def convert_adapter(adapter_dir: str | Path, base_model_dir: str | Path, *, outtype: str = "f16") -> Path:
    """Convert a PEFT LoRA folder to ``adapter.gguf`` next to it (once; reused while its checksums hold).

    Blocking (a subprocess that imports torch: seconds). ``base_model_dir`` is the base model as a
    transformers folder (only its config is read).
    """
    from training.validate import sha256_file

    folder = Path(adapter_dir)
    out = folder / ADAPTER_GGUF
    if converted_adapter_ok(folder):
        return out
    conv = converter_dir()
    tmp = folder / f".{ADAPTER_GGUF}.{os.getpid()}.{threading.get_ident()}.tmp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)])}
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(conv / "convert_lora_to_gguf.py"), "--outtype", outtype, "--outfile", str(tmp)]
    cmd += ["--base", str(base_model_dir), str(folder)]
    started = time.monotonic()
    source_sha = sha256_file(folder / "adapter_model.safetensors")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise EngineError(f"converting {folder} to GGUF failed ({proc.returncode}): " + " | ".join(tail))
    record = {"source_sha256": source_sha, "sha256": sha256_file(tmp), "outtype": outtype}
    tmp.replace(out)  # atomic: a reader never sees half a file
    tmp_record = folder / f".{ADAPTER_GGUF}.json.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp_record.write_text(json.dumps(record))
    tmp_record.replace(_conversion_record(folder))
    log.info("converted %s to %s in %.1f s", folder, out.name, time.monotonic() - started)
    return out


# --- requantizing the served GGUF -----------------------------------------------------------

QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def requantize(src: str | Path, quant: str) -> Path:
    """``src`` requantized to ``quant`` (``q8_0`` or ``q4_0``) next to it, once; reused after.

    llama.cpp's batched kernels (prefill, several sequences per step) cover Q8_0 and Q4_0 but not
    the Q4_1 the default model ships in. Q8_0 from Q4_1 keeps the Q4_1 values almost exactly (the
    weights the adapters were trained against); Q4_0 from Q4_1 rounds them a second time.
    Blocking (about a second for SmolLM2-135M).
    """
    import llama_cpp.llama_cpp as ll

    if quant not in QUANT_TYPES:
        raise EngineError(f"unknown GGUF quantization {quant!r}; use one of {', '.join(QUANT_TYPES)}")
    source = Path(src)
    out = source.with_name(f"{source.stem}.{quant}.gguf")
    if out.is_file() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    _route_llama_log(ll)
    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, QUANT_TYPES[quant])
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    started = time.monotonic()
    rc = ll.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EngineError(f"llama.cpp could not requantize {source} to {quant} ({rc})")
    tmp.replace(out)
    log.info("requantized %s to %s in %.1f s", source.name, out.name, time.monotonic() - started)
    return out


# --- the engine ------------------------------------------------------------------------------


@dataclass(eq=False)  # compared by identity: two requests are never the same one
class _Request:
    prompt_ids: list[int]
    version: str
    sampling: SamplingConfig
    loop: asyncio.AbstractEventLoop  # the caller's loop: chunks go to ``chunks`` through it
    chunks: asyncio.Queue[Chunk]
    cancel: threading.Event = field(default_factory=threading.Event)
    seq: int = -1  # llama.cpp sequence id while active
    n_past: int = 0  # tokens in this sequence's KV cells
    prefilled: bool = False
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    rng: Any = None
    started: bool = False  # its first chunk was posted (the first token is never held back)


@dataclass
class _Adapter:
    handle: Any  # llama_adapter_lora_p
    path: str
    scale: float = 1.0


class LlamaCppEngine:
    """Serve a GGUF model in process with llama.cpp; versions are GGUF LoRA adapters."""

    def __init__(
        self,
        gguf_path: str,
        *,
        quant: str | None = None,
        base_model_dir: str | None = None,
        max_prompt_tokens: int = 1536,
        max_new_tokens: int = 256,
        max_pending: int = 64,
        max_active: int = 16,
        system_prompt: str | None = None,
        n_threads: int | None = None,
        stream_interval_s: float = 0.04,
    ) -> None:
        self.gguf_path = gguf_path  # the file served (after ``load``, the requantized one when ``quant`` is set)
        self.quant = quant  # requantize ``gguf_path`` to this type first (see ``requantize``)
        self.base_model_dir = base_model_dir  # transformers folder of the same model: the LoRA converter's --base
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens  # sizes the context: a sequence holds prompt + this many tokens
        self.max_pending = max_pending
        self.max_active = max_active
        self.system_prompt = system_prompt
        self.n_threads = n_threads or os.cpu_count() or 1
        # tokens after a reply's first are handed to the event loop at most this often (first and
        # last chunks at once): every wake-up of the loop takes a core from llama.cpp's threads
        self.stream_interval_s = stream_interval_s
        self.stats = EngineStats()
        self.adapter_switches = 0  # llama_set_adapters_lora calls that changed the context's adapter
        self.adapter_switch_s = 0.0  # time in those calls; the real cost comes after (see the module docstring)
        self.conversions_s: list[float] = []  # adapter conversions to GGUF (in a thread, not on the worker)
        self.base_linear: dict[str, tuple[int, int]] = {}  # filled from the GGUF's tensors on first validation
        self.seq_capacity = 0  # tokens one sequence may hold (read back from the context)
        self._ll: Any = None  # the llama_cpp.llama_cpp module
        self._extra_buffers = True
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._n_vocab = 0
        self._template: Any = None
        self._bos = ""
        self._eos = ""
        self._inbox: queue.Queue[_Request] = queue.Queue()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._adapters: dict[str, _Adapter] = {}  # loaded and routable
        self._retired: dict[str, _Adapter] = {}  # unloaded, freed once no request uses it
        self._users: dict[str, int] = {}  # version -> requests submitted and not finished
        self._current: str | None = None  # adapter set on the context (None: none, the base model)
        self._free_seqs: list[int] = []
        self._pending = 0
        self._lock = threading.Lock()
        self._n_batch = max_prompt_tokens + max_active  # a whole prompt always fits beside every decode token
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Chunk], Chunk]]] = {}
        self._urgent = False  # the outbox holds a first or a last chunk
        self._delivered_at = 0.0

    # --- life cycle (blocking; call from a thread) --------------------------------------

    def load(self) -> None:
        import llama_cpp.llama_cpp as ll

        _route_llama_log(ll)
        self._ll = ll
        if self.quant:
            self.gguf_path = str(requantize(self.gguf_path, self.quant))
        self._extra_buffers = extra_buffers_usable(self.gguf_path)
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._worker, args=(ready,), name="llamacpp-worker", daemon=True)
        self._thread.start()
        ready.result()

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _open(self) -> None:
        """Load the model and create the context (on the worker, which owns them)."""
        ll = self._ll
        started = time.monotonic()
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.use_extra_bufts = self._extra_buffers  # AMX / repacked weights, where the CPU really runs them
        self._model = ll.llama_model_load_from_file(self.gguf_path.encode(), mparams)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {self.gguf_path}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        per_seq = -(-(self.max_prompt_tokens + self.max_new_tokens) // 256) * 256  # llama.cpp pads to 256
        cparams = ll.llama_context_default_params()
        cparams.n_seq_max = self.max_active
        cparams.n_ctx = per_seq * self.max_active
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = min(512, cparams.n_batch)
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.kv_unified = False  # one KV stream per sequence: attention never scans the others' cells
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.seq_capacity = int(ll.llama_n_ctx_seq(self._ctx))
        self._free_seqs = list(range(self.max_active))  # a heap
        self._load_template()
        log.info(
            "loaded %s in %.1f s: %d sequences of %d tokens, %d threads",
            self.gguf_path,
            time.monotonic() - started,
            self.max_active,
            self.seq_capacity,
            self.n_threads,
        )

    def _free_all(self) -> None:
        ll = self._ll
        if self._ctx:
            ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        for adapter in [*self._adapters.values(), *self._retired.values()]:
            ll.llama_adapter_lora_free(adapter.handle)
        self._adapters.clear()
        self._retired.clear()
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    # --- adapters ---------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> float:
        """Load a PEFT LoRA folder as version ``name``; returns the seconds decoding paused.

        The conversion to GGUF (once per folder) runs in a thread while decoding goes on; only
        ``llama_adapter_lora_init`` runs on the worker, between rounds.
        """
        if name in self._adapters:
            raise EngineError(f"version {name!r} is already loaded; versions are immutable")
        if self.base_model_dir is None:
            raise EngineError("the llamacpp engine needs base_model_dir (a transformers folder) to convert adapters")
        started = time.monotonic()
        out = await asyncio.to_thread(convert_adapter, path, self.base_model_dir)
        self.conversions_s.append(time.monotonic() - started)
        scale = _rslora_scale(Path(path))
        return float(await self._call(lambda: self._load_adapter(name, str(out), scale)))

    async def unload_adapter(self, name: str) -> None:
        await self._call(lambda: self._unload_adapter(name))

    def validate_adapter(self, path: str, sha256: str | None) -> None:
        """Refuse an adapter folder before loading: safetensors only, checksum, LoRA kind, shapes."""
        from training.validate import AdapterInvalidError, check_fits, read_adapter_config

        folder = Path(path)
        config = read_adapter_config(folder, sha256=sha256)
        if config.get("use_dora"):
            raise AdapterInvalidError(f"{folder}: DoRA adapters cannot be served by llama.cpp")
        if not self.base_linear:
            self.base_linear = gguf_linear_shapes(self.gguf_path)
        if self.base_linear:
            check_fits(folder, config, self.base_linear)

    def has_version(self, name: str) -> bool:
        return name == BASE_VERSION or name in self._adapters

    @property
    def versions(self) -> set[str]:
        return {BASE_VERSION, *self._adapters}

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._thread is None:
            raise EngineError("the engine is not running")
        future: Future[Any] = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def _load_adapter(self, name: str, gguf: str, scale: float) -> float:
        ll = self._ll
        started = time.monotonic()
        if name in self._adapters:
            raise EngineError(f"version {name!r} is already loaded; versions are immutable")
        handle = ll.llama_adapter_lora_init(self._model, gguf.encode())
        if not handle:
            raise EngineError(f"llama.cpp refused the adapter {gguf} (does it fit {self.gguf_path}?)")
        self._adapters[name] = _Adapter(handle, gguf, scale)
        pause = time.monotonic() - started
        self.stats.swap_pauses_s.append(pause)
        log.info("adapter %s loaded from %s; decoding paused %.0f ms", name, gguf, pause * 1000)
        return pause

    def _unload_adapter(self, name: str) -> None:
        adapter = self._adapters.pop(name, None)
        if adapter is not None:
            self._retired[name] = adapter
            self._free_retired()

    def _free_retired(self) -> None:
        """Free the unloaded adapters that no request uses any more."""
        for name in list(self._retired):
            with self._lock:
                if self._users.get(name, 0) > 0:
                    continue
            if self._current == name:
                self._use(BASE_VERSION)
            self._ll.llama_adapter_lora_free(self._retired.pop(name).handle)
            log.info("adapter %s unloaded", name)

    def _use(self, version: str) -> None:
        """Set the version's adapter on the context (none for base) if another one is set."""
        target = None if version == BASE_VERSION else version
        if target == self._current:
            return
        ll = self._ll
        started = time.perf_counter()
        if target is None:
            rc = ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            adapter = self._adapters.get(target) or self._retired.get(target)
            if adapter is None:
                raise UnknownVersionError(f"version {version!r} is not loaded")
            handles = (ll.llama_adapter_lora_p_ctypes * 1)(adapter.handle)
            scales = (ctypes.c_float * 1)(adapter.scale)
            rc = ll.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if rc != 0:
            raise EngineError(f"llama_set_adapters_lora failed ({rc}) for version {version!r}")
        self._current = target
        self.adapter_switches += 1
        self.adapter_switch_s += time.perf_counter() - started

    # --- prompts -------------------------------------------------------------------------

    def _load_template(self) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ll = self._ll
        raw = ll.llama_model_chat_template(self._model, None)
        source = raw.decode() if raw else _CHATML
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise EngineError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self._bos = self._piece(ll.llama_vocab_bos(self._vocab), special=True)
        self._eos = self._piece(ll.llama_vocab_eos(self._vocab), special=True)

    def _piece(self, token: int, *, special: bool) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

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

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Render the chat with the model's template, trimmed by ``fit_prompt``'s rule (as transformers)."""
        return fit_prompt(
            messages, lambda ms: self.tokenize(self.render(ms)), self.max_prompt_tokens, self.system_prompt
        )

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

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        version: str,
        sampling: SamplingConfig,
        cancel: threading.Event | None = None,
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
        submitted = False
        try:
            loop = asyncio.get_running_loop()
            chunks: asyncio.Queue[Chunk] = asyncio.Queue()
            prompt_ids = await asyncio.to_thread(self.prompt_ids, messages)
            request = _Request(
                prompt_ids=prompt_ids,
                version=version,
                sampling=sampling,
                loop=loop,
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
                        chunk = Chunk(chunk.delta + more.delta, more.finish_reason, more.n_tokens, more.error)
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
            self._free_all()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        active: list[_Request] = []
        batch = self._ll.llama_batch_init(self._n_batch, 0, 1)
        try:
            while not self._stopping.is_set():
                run_commands(self._commands)
                while len(active) < self.max_active:
                    try:
                        r = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    r.seq = heapq.heappop(self._free_seqs)  # the lowest free id: busy ids stay consecutive
                    active.append(r)
                if not active:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._round(active, batch)
        finally:
            for r in active:
                self._post(r, Chunk("", "error", len(r.generated), error="EngineClosed"))
            while True:
                try:
                    self._post(self._inbox.get_nowait(), Chunk("", "error", 0, error="EngineClosed"))
                except queue.Empty:
                    break
            self._deliver()
            self._ll.llama_batch_free(batch)
            self._free_all()

    def _round(self, active: list[_Request], batch: Any) -> None:
        """One round: drop cancelled requests, then one ``llama_decode`` per version in flight.

        A version's decode holds the next token of each of its decoding requests AND the whole
        prompt of its new requests (prefill mixed into the decode step), so eight customers who
        write at once get their first tokens from one forward pass instead of eight.
        """
        finished: list[_Request] = []
        groups: dict[str, list[_Request]] = {}
        for r in active:
            if r.cancel.is_set():
                self._post(r, Chunk("", "cancelled", len(r.generated)))
                finished.append(r)
            elif r.prefilled and r.n_past >= self.seq_capacity:  # the sequence is full
                self._post(r, Chunk(self._flush(r, final=True), "length", len(r.generated)))
                finished.append(r)
            else:
                groups.setdefault(r.version, []).append(r)
        # the version set on the context goes first: one switch fewer per round
        for version in sorted(groups, key=lambda v: (None if v == BASE_VERSION else v) != self._current):
            group = groups[version]
            try:
                finished += self._step(group, batch)
            except Exception as exc:
                log.exception("batched decode failed")
                for r in group:
                    self._post(r, Chunk("", "error", len(r.generated), error=type(exc).__name__))
                finished += group
        for r in finished:
            if r in active:
                active.remove(r)
                self._release(r)
        if self._urgent or time.monotonic() - self._delivered_at >= self.stream_interval_s:
            self._deliver()
        if self._retired:
            self._free_retired()

    def _release(self, r: _Request) -> None:
        """Free the request's KV cells and sequence id; the version is no longer held by it."""
        mem = self._ll.llama_get_memory(self._ctx)
        self._ll.llama_memory_seq_rm(mem, r.seq, -1, -1)
        heapq.heappush(self._free_seqs, r.seq)
        r.seq = -1
        with self._lock:
            self._users[r.version] -= 1

    def _fill(self, batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _step(self, group: list[_Request], batch: Any) -> list[_Request]:
        """One ``llama_decode`` for one version: a token for every decoding request plus the prompts
        of new ones (as many as fit in the batch; the rest wait a round). Returns those finished.
        """
        self._use(group[0].version)
        bos = max(self._ll.llama_vocab_bos(self._vocab), 0)
        room = self._n_batch - sum(1 for r in group if r.prefilled)
        starting: list[_Request] = []
        for r in group:  # new requests in arrival order, as many as fit; the batch always fits one
            if not r.prefilled:
                if len(r.prompt_ids or [bos]) > room:
                    break
                room -= len(r.prompt_ids or [bos])
                starting.append(r)
        # in sequence-id order: a non-unified KV cache puts only consecutive sequence ids in one
        # micro-batch, so any other order splits the step into one graph per sequence
        rows: list[tuple[_Request, int]] = []  # (request, batch index of its logits)
        n = 0
        for r in sorted(group, key=lambda r: r.seq):
            if r.prefilled:
                self._fill(batch, n, r.generated[-1], r.n_past, r.seq, True)
                n += 1
            elif r in starting:
                ids = r.prompt_ids or [bos]
                for i, token in enumerate(ids):
                    self._fill(batch, n + i, token, i, r.seq, i == len(ids) - 1)
                n += len(ids)
            else:
                continue
            rows.append((r, n - 1))
        decoding = [r for r, _ in rows if r.prefilled]
        batch.n_tokens = n
        rc = self._ll.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed ({rc})")
        if decoding:
            self.stats.decode_steps += 1
        for r in decoding:
            r.n_past += 1
        for r in starting:
            self.stats.requests += 1
            r.n_past = max(len(r.prompt_ids), 1)
            r.prefilled = True
            if r.sampling.temperature > 0:
                r.rng = np.random.default_rng(r.sampling.seed)
        return [r for r, i in rows if self._accept(r, self._sample(self._logits(i), r))]

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

    def _logits(self, i: int) -> Any:
        """The logits of batch position ``i`` (a view on llama.cpp's buffer: use before the next decode)."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,))

    def _accept(self, r: _Request, token: int) -> bool:
        """Take a sampled token: stream the new text; True when the reply is finished."""
        self.stats.tokens += 1
        if self._ll.llama_vocab_is_eog(self._vocab, token):
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

    def _sample(self, logits: Any, r: _Request) -> int:
        """Greedy at temperature <= 0; else temperature and top-p with the request's generator."""
        s = r.sampling
        if s.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / s.temperature
        z -= z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if s.top_p < 1.0:
            k = min(_TOP_CANDIDATES, probs.size)
            order = np.argpartition(-probs, k - 1)[:k]
            order = order[np.argsort(-probs[order], kind="stable")]
            if probs[order].sum() < s.top_p and k < probs.size:  # a flat distribution: sort it all
                order = np.argsort(-probs, kind="stable")
            kept = probs[order]
            keep = np.cumsum(kept) - kept < s.top_p
            order, kept = order[keep], kept[keep]
        else:
            order, kept = np.arange(probs.size), probs
        cdf = np.cumsum(kept)
        choice = int(np.searchsorted(cdf, r.rng.random() * cdf[-1], side="right"))
        return int(order[min(choice, len(order) - 1)])

    def _flush(self, r: _Request, *, final: bool) -> str:
        """New text since the last flush; holds back a trailing partial UTF-8 character."""
        text = self.detokenize(r.generated)
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[r.sent_chars :]
        r.sent_chars = len(text)
        return delta


def _put_all(items: list[tuple[asyncio.Queue[Chunk], Chunk]]) -> None:
    for chunks, chunk in items:
        chunks.put_nowait(chunk)


_llama_log = logging.getLogger("learnloop.llama.cpp")
_log_callback: Any = None  # the ctypes callback: must outlive every call llama.cpp makes to it


def _route_llama_log(ll: Any) -> None:
    """Send llama.cpp's log to Python logging (its info lines at DEBUG) instead of stderr."""
    global _log_callback
    if _log_callback is not None:
        return
    levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 cont
    last = [logging.DEBUG]

    def callback(level: int, text: bytes | None, _user: Any) -> None:
        if level != 5:
            last[0] = levels.get(level, logging.DEBUG)
        line = (text or b"").decode("utf-8", errors="replace").rstrip()
        if line:
            _llama_log.log(last[0], "%s", line)

    _log_callback = ll.llama_log_callback(callback)
    ll.llama_log_set(_log_callback, ctypes.c_void_p(0))


_extra_buffers: dict[str, bool] = {}

_PROBE = """
import sys, llama_cpp.llama_cpp as ll
quiet = ll.llama_log_callback(lambda *a: None)
ll.llama_log_set(quiet, ll.ctypes.c_void_p(0))
ll.llama_backend_init()
p = ll.llama_model_default_params()
p.use_extra_bufts = True
m = ll.llama_model_load_from_file(sys.argv[1].encode(), p)
c = ll.llama_context_default_params()
c.n_ctx, c.n_batch, c.n_threads, c.n_threads_batch = 256, 64, 1, 1
ctx = ll.llama_init_from_model(m, c)
b = ll.llama_batch_init(64, 0, 1)
for i in range(64):
    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = 1, i, 1, i == 63
    b.seq_id[i][0] = 0
b.n_tokens = 64
sys.exit(ll.llama_decode(ctx, b))
"""


def extra_buffers_usable(gguf_path: str) -> bool:
    """Whether llama.cpp may put weights in its extra buffer types (AMX tiles, repacked layouts).

    Some virtual machines advertise AMX (``amx_tile`` in /proc/cpuinfo) but fault on its
    instructions (SIGILL in the first prefill). Where AMX is advertised, a subprocess decodes
    once with the extra buffers to find out; ``$LEARNLOOP_LLAMA_EXTRA_BUFTS`` (0 or 1) decides instead.
    """
    if (env := os.environ.get("LEARNLOOP_LLAMA_EXTRA_BUFTS")) in ("0", "1"):
        return env == "1"
    try:
        advertised = "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        advertised = False
    if not advertised:
        return True
    if gguf_path not in _extra_buffers:
        proc = subprocess.run([sys.executable, "-c", _PROBE, gguf_path], capture_output=True, timeout=300)
        _extra_buffers[gguf_path] = proc.returncode == 0
        if proc.returncode != 0:
            log.warning(
                "llama.cpp's AMX/repacked weights fail on this CPU (probe exit %s); serving without them",
                proc.returncode,
            )
    return _extra_buffers[gguf_path]


_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _rslora_scale(folder: Path) -> float:
    """llama.cpp scales a LoRA by alpha/r; rank-stabilised LoRA (PEFT use_rslora) wants alpha/sqrt(r)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return 1.0
    if config.get("use_rslora") and config.get("r"):
        return math.sqrt(float(config["r"]))
    return 1.0


def gguf_linear_shapes(gguf_path: str) -> dict[str, tuple[int, int]]:
    """Linear layer (transformers module name) -> (out, in), read from a GGUF's tensor infos.

    Empty when the architecture is unknown to the installed ``gguf`` package (then shapes are
    not checked before loading; llama.cpp still refuses an adapter that does not fit).
    """
    try:
        import gguf

        reader = gguf.GGUFReader(gguf_path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        n_blocks = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        names = gguf.get_tensor_name_map(by_name[arch], n_blocks)
        shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    except Exception as exc:  # unknown architecture or an old gguf package: skip the shape check
        log.warning("cannot read layer shapes from %s (%s); adapter shapes are not checked", gguf_path, exc)
        return {}
    linear: dict[str, tuple[int, int]] = {}
    for hf_name, (_, gguf_name) in names.mapping.items():
        shape = shapes.get(f"{gguf_name}.weight")
        if shape is not None and len(shape) == 2:
            linear[hf_name] = (shape[1], shape[0])  # GGUF lists ne0 (in) first
    return linear
