"""The ``openai`` engine: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server) serves.

learnloop stays the loop around it: replies stream from ``POST {url}/chat/completions``
(server-sent events); each model version is a LoRA adapter the server loaded at run time
under an immutable name (vLLM: ``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``;
start vLLM with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, see
``deploy/vllm.md``). ``base`` is the served model itself.

Stop: the HTTP response is closed at the next chunk, which makes the server abort the
request. Overload: a bounded number of replies in flight here (``OverloadedError`` past
it), and the upstream's 429/503 become ``overloaded`` too. Prompt limit: without the model's
tokenizer here, older turns are dropped to fit ``max_prompt_tokens`` at 4 characters a token
(the system prompt and the last user turn are always kept).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from feedback.records import BASE_VERSION
from server.engine import Chunk, EngineError, EngineStats, OverloadedError, SamplingConfig, UnknownVersionError

log = logging.getLogger("learnloop.engine.openai")

CHARS_PER_TOKEN = 4


def trim_messages(messages: list[dict[str, str]], max_chars: int) -> list[dict[str, str]]:
    """Drop whole older turns (never the system prompt or the last turn) until the text fits."""
    msgs = list(messages)
    first = 1 if msgs and msgs[0]["role"] == "system" else 0
    while sum(len(m["content"]) for m in msgs) > max_chars and len(msgs) - first > 1:
        del msgs[first]
    return msgs


class OpenAIEngine:
    """Serve through an OpenAI-compatible HTTP server; versions are its runtime-loaded LoRAs."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        adapter_prefix: str = "learnloop",
        max_prompt_tokens: int = 1536,
        max_pending: int = 64,
        system_prompt: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.adapter_prefix = adapter_prefix
        self.max_prompt_tokens = max_prompt_tokens
        self.max_pending = max_pending
        self.system_prompt = system_prompt
        self.stats = EngineStats()
        self.base_linear: dict[str, tuple[int, int]] = {}
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._adapters: dict[str, str] = {}  # version -> name on the server
        self._pending = 0

    # --- life cycle ---------------------------------------------------------------------

    def load(self) -> None:
        """Check that the server answers and serves the model (blocking)."""
        try:
            r = httpx.get(f"{self.url}/models", headers=self._headers, timeout=10)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineError(f"the OpenAI-compatible server at {self.url} does not answer: {exc}") from exc
        served = [m.get("id") for m in r.json().get("data", [])]
        if self.model not in served:
            log.warning("%s serves %s, not %r; requests name %r anyway", self.url, served, self.model, self.model)

    def close(self) -> None:
        pass  # the async client is closed by ``aclose`` (the app calls it) or with the loop

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(headers=self._headers, timeout=self._timeout)
        return self._client

    # --- versions -----------------------------------------------------------------------

    def served_name(self, version: str) -> str:
        return self.model if version == BASE_VERSION else self._adapters[version]

    def has_version(self, name: str) -> bool:
        return name == BASE_VERSION or name in self._adapters

    @property
    def versions(self) -> set[str]:
        return {BASE_VERSION, *self._adapters}

    def validate_adapter(self, path: str, sha256: str | None) -> None:
        from training.validate import check_adapter_files

        check_adapter_files(Path(path), sha256=sha256)

    async def load_adapter(self, name: str, path: str) -> float:
        """Ask the server to load the adapter (vLLM's runtime LoRA API) under an immutable name."""
        if name in self._adapters:
            raise EngineError(f"version {name!r} is already loaded; versions are immutable")
        served = f"{self.adapter_prefix}-{name}"
        started = time.monotonic()
        root = self.url.removesuffix("/v1")
        r = await self._http().post(f"{root}/v1/load_lora_adapter", json={"lora_name": served, "lora_path": path})
        if r.status_code == 404:
            raise EngineError(
                f"{self.url} has no runtime LoRA API (/v1/load_lora_adapter): serve with vLLM and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to hot-swap versions"
            )
        if r.status_code >= 400 and "already been loaded" not in r.text:
            raise EngineError(f"loading adapter {served} failed: {r.status_code} {r.text[:300]}")
        self._adapters[name] = served
        pause = time.monotonic() - started
        self.stats.swap_pauses_s.append(pause)
        return pause

    async def unload_adapter(self, name: str) -> None:
        served = self._adapters.pop(name, None)
        if served is None:
            return
        root = self.url.removesuffix("/v1")
        r = await self._http().post(f"{root}/v1/unload_lora_adapter", json={"lora_name": served})
        if r.status_code >= 400:
            log.warning("unloading adapter %s failed: %s %s", served, r.status_code, r.text[:200])

    # --- generation ---------------------------------------------------------------------

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        version: str,
        sampling: SamplingConfig,
        cancel: threading.Event | None = None,
    ) -> AsyncIterator[Chunk]:
        if not self.has_version(version):
            raise UnknownVersionError(f"version {version!r} is not loaded")
        if self._pending >= self.max_pending:
            raise OverloadedError(f"{self._pending} replies in progress; limit {self.max_pending}", retry_after=1.0)
        self._pending += 1
        try:
            msgs = list(messages)
            if self.system_prompt and (not msgs or msgs[0]["role"] != "system"):
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
            body: dict[str, Any] = {
                "model": self.served_name(version),
                "messages": trim_messages(msgs, self.max_prompt_tokens * CHARS_PER_TOKEN),
                "stream": True,
                "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
            }
            if sampling.seed is not None:
                body["seed"] = sampling.seed
            self.stats.requests += 1
            n_tokens = 0
            async with self._http().stream("POST", f"{self.url}/chat/completions", json=body) as r:
                if r.status_code in (429, 503):
                    retry = float(r.headers.get("retry-after", "1") or 1)
                    raise OverloadedError(f"the model server is busy ({r.status_code})", retry_after=retry)
                if r.status_code >= 400:
                    detail = (await r.aread()).decode(errors="replace")[:300]
                    raise EngineError(f"the model server answered {r.status_code}: {detail}")
                async for line in r.aiter_lines():
                    if cancel is not None and cancel.is_set():
                        yield Chunk("", "cancelled", n_tokens)
                        return  # leaving the block closes the response: the server aborts
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    choice = (event.get("choices") or [{}])[0]
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if delta:
                        n_tokens += 1
                        self.stats.tokens += 1
                    finish = choice.get("finish_reason")
                    if finish is not None:
                        usage = event.get("usage") or {}
                        n = int(usage.get("completion_tokens") or n_tokens)
                        yield Chunk(delta, "length" if finish == "length" else "stop", n)
                        return
                    if delta:
                        yield Chunk(delta)
            yield Chunk("", "stop", n_tokens)
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            log.error("streaming from %s failed: %s", self.url, exc)
            yield Chunk("", "error", 0, error=type(exc).__name__)
        except asyncio.CancelledError:
            raise
        finally:
            self._pending -= 1
