"""A local stand-in for vLLM's OpenAI-compatible server, which cannot run here (it needs a GPU).

It answers the request and response shapes vLLM documents and implements (v0.6.6, the image
``deploy/compose.yaml`` pins; ``vllm/entrypoints/openai/serving_models.py``,
``docs/source/models/lora.rst``, "Dynamically serving LoRA Adapters"):

- ``GET /v1/models``: the served model, then every LoRA adapter loaded (``parent`` the base).
- ``POST /v1/chat/completions``: ``model`` must name the served model or a loaded adapter, else
  404 ``NotFoundError`` "The model `x` does not exist."; with ``stream`` the reply comes as
  server-sent ``chat.completion.chunk`` events (a first one with the role, one per piece of text,
  one with ``finish_reason``, then ``data: [DONE]``), else one ``chat.completion``.
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``: 200 with the plain text
  "Success: LoRA adapter 'NAME' added successfully."; 400 ``InvalidUserInput`` for a missing
  field or a name already loaded ("The lora adapter 'NAME' has already been loaded."); 404
  ``NotFoundError`` when no adapter is found at the path (vLLM reads it from its own disk).
- ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``: 200 "Success: LoRA adapter 'NAME' removed
  successfully."; 404 ``NotFoundError`` "The lora adapter 'NAME' cannot be found.".
- Both LoRA routes exist only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (``runtime_lora``);
  without it they are FastAPI's plain 404.

Errors are vLLM's ``ErrorResponse``: ``{"object": "error", "message", "type", "param", "code"}``.
The reply is not a model's: it names the model it was asked for ("Answer from learnloop-v1 ..."),
so a test sees which adapter served each request. Every request body is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.im_standins import StandIn


def _error(message: str, err_type: str, code: int) -> JSONResponse:
    body = {"object": "error", "message": message, "type": err_type, "param": None, "code": code}
    return JSONResponse(body, status_code=code)


class VllmStandIn(StandIn):
    """One vLLM replica serving ``served_model`` (``--served-model-name``) with ``--enable-lora``."""

    def __init__(self, served_model: str, *, runtime_lora: bool = True) -> None:
        super().__init__()
        self.served_model = served_model
        self.loras: dict[str, str] = {}  # lora_name -> lora_path, in load order
        self.chat_bodies: list[dict[str, Any]] = []  # every chat completion request, as received
        self.lora_calls: list[tuple[str, dict[str, Any]]] = []  # ("load" | "unload", body)
        self.unreadable: set[str] = set()  # adapter paths this replica cannot read (its volume lacks them)
        self.hold: asyncio.Event | None = None  # when set, replies wait for it after their first chunk
        self._ids = itertools.count(1)

        @self.app.get("/v1/models")
        async def models() -> dict[str, Any]:
            cards = [{"id": self.served_model, "object": "model", "owned_by": "vllm", "root": self.served_model}]
            cards += [
                {"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": self.served_model}
                for name, path in self.loras.items()
            ]
            return {"object": "list", "data": cards}

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            self.chat_bodies.append(body)
            model = body.get("model")
            if model != self.served_model and model not in self.loras:
                return _error(f"The model `{model}` does not exist.", "NotFoundError", 404)
            words = f"Answer from {model} to {len(body['messages'])} messages.".split(" ")
            limit = int(body.get("max_tokens") or 16)
            pieces = [w + " " for w in words[:-1]] + [words[-1]]
            finish = "length" if len(pieces) > limit else "stop"
            pieces = pieces[:limit]
            rid = f"chatcmpl-{next(self._ids)}"
            created = int(time.time())
            if not body.get("stream"):
                return JSONResponse(
                    {
                        "id": rid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "".join(pieces)},
                                "logprobs": None,
                                "finish_reason": finish,
                            }
                        ],
                        "usage": {
                            "prompt_tokens": 1,
                            "completion_tokens": len(pieces),
                            "total_tokens": 1 + len(pieces),
                        },
                    }
                )

            def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
                event = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                }
                return f"data: {json.dumps(event)}\n\n"

            async def events() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": ""})
                if self.hold is not None:
                    await self.hold.wait()
                for piece in pieces:
                    yield chunk({"content": piece})
                yield chunk({"content": ""}, finish)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        if not runtime_lora:
            return

        @self.app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = await request.json()
            self.lora_calls.append(("load", body))
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                return _error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
            if name in self.loras:
                return _error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400)
            if path in self.unreadable or not (Path(path) / "adapter_config.json").is_file():
                return _error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
            self.loras[name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @self.app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            body = await request.json()
            self.lora_calls.append(("unload", body))
            name = body.get("lora_name")
            if not name:
                return _error("either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput", 400)
            if name not in self.loras:
                return _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
            del self.loras[name]
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @property
    def base_url(self) -> str:
        """What ``model.openai_url`` names: the server's ``/v1``."""
        return f"{self.url}/v1"

    def models_asked(self) -> list[str]:
        return [str(b["model"]) for b in self.chat_bodies]
