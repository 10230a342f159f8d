"""A Python client for bots on learnloop's chat websocket (docs/protocol.md).

Imports only the standard library and ``websockets``: a bot process never loads the model,
the store or the training stack. ``AsyncChatClient`` (``connect``) for asyncio code,
``ChatClient`` for plain scripts and synchronous bot frameworks::

    async with connect("ws://127.0.0.1:8765", user="alice") as client:
        reply = await client.send("Where is my order?")
        await client.rate(reply.message_id, +1)

What the client does when the connection drops (a server restart, the network): it
reconnects with exponential backoff and jitter and says ``hello {conversation_id}``, which
resumes the stored branch of the same conversation. Then:

- A rating without its ``ack`` is sent again with the same ``id``: the server stores a
  replayed id once and acknowledges it again, so a rating is stored exactly once however
  often the connection drops. A rating made while the server is down waits and goes out
  when it is back.
- A message without its ``ack`` is sent again as it was. The server may have stored it and
  lost only the ``ack`` (the window between its commit and the frame): then the
  conversation holds the turn twice. Rare, and the alternative (not resending) loses the
  message.
- A message that was acknowledged but whose reply did not finish: the user turn is stored,
  the reply in flight was discarded with the connection, and the resumed branch ends with
  that turn. Sending the message again would put the turn into the conversation twice (in
  the model's context and in the training data), so the client sends ``regenerate`` with
  the user turn's id instead, which asks the model to answer the stored turn. A stream
  then starts over: ``ReplyStream.restarted`` turns true. (If the reply was in fact stored
  and only its ``done`` was lost, the branch ends with that reply and the request raises
  ChatError ``not_found``; the reply is in the conversation.)
- A regeneration that did not finish is asked for again (nothing of it was stored).
- A ``stop`` asked for before the drop is sent again after the request, so the reply still
  ends ``cancelled`` and has a stored id to rate.

While an operator has taken the conversation over, ``send`` returns at the ``ack`` with
``finish_reason`` OPERATOR; the operator's answer arrives as an OperatorMessage event.

``rate_limited`` and ``overloaded`` are retried after the server's ``retry_after``, up to
``max_retries`` times, then raised as ChatError. A refused ``hello`` (``unauthorized``, an
unknown conversation) and a handshake refused with HTTP 401 (wrong ``token``, which goes in
the handshake as ``Authorization: Bearer``) or 403 are raised at once and never retried; a
handshake refused with 429 (too many connections from this address) and a ``hello`` refused
with ``rate_limited`` (too many for this user) are retried with the backoff.
"""

from server.client.aio import AsyncChatClient, connect
from server.client.frames import (
    Ack,
    ChatError,
    ClientError,
    ConnectionLost,
    Done,
    ErrorCode,
    ErrorFrame,
    Event,
    FinishReason,
    OperatorJoined,
    OperatorLeft,
    OperatorMessage,
    Ready,
    Reply,
    Token,
)
from server.client.pending import ReplyStream
from server.client.sync import ChatClient, SyncReplyStream

__all__ = [
    "Ack",
    "AsyncChatClient",
    "ChatClient",
    "ChatError",
    "ClientError",
    "ConnectionLost",
    "Done",
    "ErrorCode",
    "ErrorFrame",
    "Event",
    "FinishReason",
    "OperatorJoined",
    "OperatorLeft",
    "OperatorMessage",
    "Ready",
    "Reply",
    "ReplyStream",
    "SyncReplyStream",
    "Token",
    "connect",
]
