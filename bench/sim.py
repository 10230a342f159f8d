"""The simulated customers of ``bench/learning.py``, over real websockets.

A customer says hello, sends the turns of one paraphrase in order on one conversation (a
greeting or some context first, the question last), waits for each reply, and the rubric
rates the reply to the last turn. Then, as told: a thumb on that reply, and a next message
(``bench/reactions.py``), sent as an ordinary ``message`` frame, so it is stored as the next
user turn; the model's answer to it is awaited but not rated. A customer who leaves sends
nothing more.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import connect

from bench.rater import Deployment, Intent, Script
from bench.reactions import Reaction, react


async def _reply(ws: Any, text: str, client_id: str) -> tuple[str, dict[str, Any]]:
    """Send one user turn; collect the streamed reply: (reply text, done frame)."""
    await ws.send(json.dumps({"type": "message", "text": text, "client_id": client_id}))
    parts: list[str] = []
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "token":
            parts.append(frame["delta"])
        elif frame["type"] == "done":
            return "".join(parts), frame
        elif frame["type"] == "error":
            raise RuntimeError(frame)


async def converse(ws: Any, script: Script, user: str) -> tuple[str, dict[str, Any], str, float]:
    """Say hello, send every turn of ``script`` in order on one conversation: (reply to the last
    turn, its done frame, the conversation id, seconds from sending the last turn to its done frame)."""
    await ws.send(json.dumps({"type": "hello", "user": user}))
    ready = json.loads(await ws.recv())
    for k, turn in enumerate(script[:-1]):
        await _reply(ws, turn, f"c{k}")
    sent = time.perf_counter()
    reply, done = await _reply(ws, script[-1], "q")
    return reply, done, ready["conversation_id"], time.perf_counter() - sent


async def ask(port: int, script: Script, user: str) -> tuple[str, str, str]:
    """One customer, one question, over a real websocket: (reply text, message id, version)."""
    async with connect(f"ws://127.0.0.1:{port}") as ws:
        reply, done, _, _ = await converse(ws, script, user)
        return reply, done["message_id"], done["model_version"]


@dataclass(frozen=True)
class Answer:
    up: bool  # the rubric's verdict on the reply to the question
    reasons: tuple[str, ...]  # the rubric's reasons
    reply: str
    message_id: str
    version: str
    rated: bool  # the customer clicked a thumb
    reaction: Reaction | None  # what the customer wrote next (None: not asked to react)
    conversation_id: str
    seconds: float  # from sending the question to the reply's done frame: time to a complete reply


async def ask_and_rate(
    port: int,
    script: Script,
    user: str,
    intent: Intent,
    deployment: Deployment,
    *,
    send_rating: bool,
    react_rng: random.Random | None = None,
) -> Answer:
    """A customer asks ``script``; the rubric rates the reply; a thumb if ``send_rating``; a
    next message drawn with ``react_rng`` if one is given."""
    async with connect(f"ws://127.0.0.1:{port}") as ws:
        reply, frame, conversation_id, seconds = await converse(ws, script, user)
        verdict = deployment.rate(intent, reply)
        if send_rating:
            reason = None if verdict.up else verdict.reasons[0][:200]
            await ws.send(
                json.dumps(
                    {
                        "type": "rating",
                        "message_id": frame["message_id"],
                        "value": 1 if verdict.up else -1,
                        "id": "r",
                        "reason": reason,
                    }
                )
            )
            ack = json.loads(await ws.recv())
            assert ack["type"] == "ack", ack
        reaction = None
        if react_rng is not None:
            reaction = react(react_rng, deployment, intent, script, up=verdict.up)
            if reaction.text is not None:
                await _reply(ws, reaction.text, "next")
        return Answer(
            verdict.up,
            verdict.reasons,
            reply,
            frame["message_id"],
            frame["model_version"],
            send_rating,
            reaction,
            conversation_id,
            seconds,
        )
