"""The ``openai`` engine: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server) serves.

learnloop stays the loop around it: replies stream from ``POST {url}/chat/completions``
(server-sent events); each model version is a LoRA adapter the server loaded at run time
under an immutable name (vLLM: ``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``;
start vLLM with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, see
``deploy/vllm.md``). ``base`` is the served model itself.

Several replicas (``urls``): each one is asked to load every version, and a version serves only
once every replica loaded it; if one refuses, the others unload it again and the load fails
(the release refuses the version: never half-served). Each reply goes to the replica with the
fewest replies in flight here, in turn when they tie. A load balancer's single URL cannot
hot-swap: a load call through it reaches one replica only.

Template injection: the remote server renders the chat with its template and tokenizes it, so
a special token typed in a message (``<|im_start|>``) would become a control id there. Every
message's text is defused before it is sent (``feedback.specials``), with the special tokens the
served model's tokenizer declares, read from the local files of ``tokenizer`` (``model.name``;
nothing is downloaded). Where no local tokenizer is found, every ``<`` and ``[`` followed by a
visible character gets a word joiner instead (``defuse_openers``): broader than needed, said in
one warning line at start.

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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import httpx

from feedback.records import BASE_VERSION
from feedback.specials import defuse, defuse_openers, tokenizer_specials
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
    """Serve through OpenAI-compatible HTTP servers (one or several replicas of one model);
    versions are their runtime-loaded LoRAs."""

    def __init__(
        self,
        urls: str | Sequence[str],
        model: str,
        *,
        api_key: str | None = None,
        adapter_prefix: str = "learnloop",
        max_prompt_tokens: int = 1536,
        max_pending: int = 64,
        system_prompt: str | None = None,
        timeout_s: float = 120.0,
        tokenizer: str | None = None,
    ) -> None:
        """``urls``: each replica's base URL (``http://host:8000/v1``); ``tokenizer``: a local model
        folder or hub id whose cached tokenizer declares the special tokens to defuse (None: the
        fallback rule)."""
        listed = [urls] if isinstance(urls, str) else list(urls)
        if not listed:
            raise EngineError("the openai engine needs at least one server URL")
        self.urls = tuple(u.rstrip("/") for u in listed)
        self.url = self.urls[0]
        self.model = model
        self.adapter_prefix = adapter_prefix
        self.max_prompt_tokens = max_prompt_tokens
        self.max_pending = max_pending
        self.system_prompt = system_prompt
        self.tokenizer = tokenizer
        self.stats = EngineStats()
        self.special_texts: tuple[str, ...] = ()  # set by ``load`` from the tokenizer's files
        self._defuse: Callable[[str], str] = defuse_openers  # until ``load`` read the tokenizer
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._adapters: dict[str, str] = {}  # version -> name on the servers
        self._pending = 0
        self._in_flight = [0] * len(self.urls)  # per replica: replies streaming from it now
        self._turn = 0  # the replica first in line when in-flight counts tie

    # --- life cycle ---------------------------------------------------------------------

    def load(self) -> None:
        """Read the special tokens to defuse; check that every replica answers (blocking)."""
        self._read_specials()
        for url in self.urls:
            try:
                r = httpx.get(f"{url}/models", headers=self._headers, timeout=10)
                r.raise_for_status()
            except httpx.HTTPError as exc:
                raise EngineError(f"the OpenAI-compatible server at {url} does not answer: {exc}") from exc
            served = [m.get("id") for m in r.json().get("data", [])]
            if self.model not in served:
                log.warning("%s serves %s, not %r; requests name %r anyway", url, served, self.model, self.model)

    def _read_specials(self) -> None:
        specials: tuple[str, ...] = ()
        why = "no model.name to read a tokenizer from"
        if self.tokenizer is not None:
            try:
                from transformers import AutoTokenizer

                specials = tokenizer_specials(AutoTokenizer.from_pretrained(self.tokenizer, local_files_only=True))
                why = f"the tokenizer of {self.tokenizer} declares no special token"
            except (OSError, ValueError) as exc:  # not in a local folder nor in the hub cache: no download
                why = f"no local tokenizer for {self.tokenizer} ({type(exc).__name__})"
        if specials:
            self.special_texts = specials
            self._defuse = lambda text: defuse(text, specials)
            return
        self.special_texts = ()
        self._defuse = defuse_openers
        log.warning(
            "%s: every '<' and '[' followed by a visible character in a message gets a word joiner before "
            "it is sent, so no special token that begins with either reaches the server as typed; set model.name to the "
            "served model's folder (or fetch its tokenizer into the Hugging Face cache) to defuse exactly "
            "its special tokens",
            why,
        )

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
        """Ask every replica to load the adapter (vLLM's runtime LoRA API) under an immutable name.

        All or none: when a replica refuses, the replicas that loaded it unload it again and
        ``EngineError`` says which refused; the version is then not served anywhere.
        """
        if name in self._adapters:
            raise EngineError(f"version {name!r} is already loaded; versions are immutable")
        served = f"{self.adapter_prefix}-{name}"
        started = time.monotonic()
        outcomes = await asyncio.gather(*(self._load_on(url, served, path) for url in self.urls))
        refused = [problem for problem in outcomes if problem is not None]
        if refused:
            loaded = [url for url, problem in zip(self.urls, outcomes, strict=True) if problem is None]
            await asyncio.gather(*(self._unload_on(url, served) for url in loaded))
            raise EngineError(
                f"loading adapter {served} failed on {len(refused)} of {len(self.urls)} "
                f"server(s), so no server serves it: " + "; ".join(refused)
            )
        self._adapters[name] = served
        pause = time.monotonic() - started
        self.stats.swap_pauses_s.append(pause)
        return pause

    async def _load_on(self, url: str, served: str, path: str) -> str | None:
        """Load on one replica; None when it did (or already had it), else what went wrong."""
        root = url.removesuffix("/v1")
        try:
            r = await self._http().post(f"{root}/v1/load_lora_adapter", json={"lora_name": served, "lora_path": path})
        except httpx.HTTPError as exc:
            return f"{url}: {type(exc).__name__}: {exc}"
        if r.status_code == 404 and "adapter" not in r.text.lower():  # no such route (vLLM's own 404s name the adapter)
            return (
                f"{url} has no runtime LoRA API (/v1/load_lora_adapter): serve with vLLM and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to hot-swap versions"
            )
        if r.status_code >= 400 and "already been loaded" not in r.text:
            return f"{url}: {r.status_code} {r.text[:300]}"
        return None

    async def unload_adapter(self, name: str) -> None:
        served = self._adapters.pop(name, None)
        if served is None:
            return
        await asyncio.gather(*(self._unload_on(url, served) for url in self.urls))

    async def _unload_on(self, url: str, served: str) -> None:
        root = url.removesuffix("/v1")
        try:
            r = await self._http().post(f"{root}/v1/unload_lora_adapter", json={"lora_name": served})
        except httpx.HTTPError as exc:
            log.warning("unloading adapter %s from %s failed: %s", served, url, exc)
            return
        if r.status_code >= 400:
            log.warning("unloading adapter %s from %s failed: %s %s", served, url, r.status_code, r.text[:200])

    def _pick(self) -> int:
        """The replica for the next reply: fewest replies in flight, in turn when they tie."""
        n = len(self.urls)
        i = min(range(n), key=lambda k: (self._in_flight[k], (k - self._turn) % n))
        self._turn = (i + 1) % n
        return i

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
        replica = self._pick()
        url = self.urls[replica]
        self._in_flight[replica] += 1
        try:
            sent = [{**m, "content": self._defuse(m["content"])} for m in messages]
            body: dict[str, Any] = {
                "model": self.served_name(version),
                "messages": trim_messages(sent, self.max_prompt_tokens * CHARS_PER_TOKEN, self.system_prompt),
                "stream": True,
                "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
            }
            if sampling.seed is not None:
                body["seed"] = sampling.seed
            self.stats.requests += 1
            n_tokens = 0
            async with self._http().stream("POST", f"{url}/chat/completions", json=body) as r:
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
            log.error("streaming from %s failed: %s", url, exc)
            yield Chunk("", "error", 0, error=type(exc).__name__)
        except asyncio.CancelledError:
            raise
        finally:
            self._pending -= 1
            self._in_flight[replica] -= 1
