"""The ``openai`` engine: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server) serves.

learnloop stays the loop around it: replies stream from ``POST {url}/chat/completions``
(server-sent events); each model version is a LoRA adapter the server loaded at run time
under an immutable name (vLLM: ``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``;
start vLLM with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, see
``deploy/vllm.md``). ``base`` is the served model itself.

Stop: the HTTP response is closed at the next chunk, which makes the server abort the
request. Overload: a bounded number of replies in flight here (``OverloadedError`` past
it), and the upstream's 429/503 become ``overloaded`` too. Prompt limit: every engine's rule
(``fit_turns``), measured without the model's tokenizer at 4 characters a token: the system
prompt and the last turn are always kept, older turns dropped first until the text fits
``max_prompt_tokens``. A last turn too long alone is sent whole (the server refuses it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx

from feedback.records import BASE_VERSION
from server.engines.base import (
    Chunk,
    EngineError,
    EngineStats,
    OverloadedError,
    SamplingConfig,
    UnknownVersionError,
    fit_turns,
)

log = logging.getLogger("learnloop.engine.openai")

CHARS_PER_TOKEN = 4


def _text(messages: list[dict[str, str]]) -> str:
    return "".join(m["content"] for m in messages)


def trim_messages(
    messages: list[dict[str, str]], max_chars: int, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """The chat as sent: ``fit_turns``'s rule with the text measured in characters."""
    return fit_turns(messages, _text, max_chars, system_prompt)[0]


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

    def linear_shapes(self) -> None:
        """None: the model is on the server, not here (only an adapter's files are checked)."""
        return None

    def adapter_refusal(self, config: dict[str, Any]) -> str | None:
        return None  # the server says what it cannot load when it is asked to

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

    def redirect(self, versions: Iterable[str], to: str) -> None:
        """Nothing to redirect here: a request is sent to the server when it is asked, naming its
        adapter, and waits in the server's own queue (vLLM's), out of learnloop's reach."""

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
            body: dict[str, Any] = {
                "model": self.served_name(version),
                "messages": trim_messages(messages, self.max_prompt_tokens * CHARS_PER_TOKEN, self.system_prompt),
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
