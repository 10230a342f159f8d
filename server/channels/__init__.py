"""Channels: the public ways in beside the raw websocket protocol, on their own HTTP listener.

- ``http``: the listener (FastAPI under an embedded uvicorn), one error envelope, body and
  rate limits; channels add routers to ``create_channels_app``.
- ``widget``: ``/widget.js`` (the embeddable chat bubble) and its demo page.
- ``identity``: which sites and origins may open a widget conversation, and verified user ids.
- IM channels, each a router over the same reply path (``server.replies``) and store:
  ``telegram`` (Bot API webhook), ``slack`` (Events API and interactivity), ``webhooks``
  (Standard Webhooks both ways); ``signing`` (every signature and secret check, pure),
  ``im`` (what they share: the inbound event, the platform interface, the wiring),
  ``inbox`` (processes each event once: a conversation per thread, the reply, ratings),
  ``outbox`` (delivers every platform call with backoff until it is done or given up),
  ``lanes`` (the loop both workers share); ``config`` holds their settings.

The operator console keeps its own, operator-only listener (``server.console``). Nothing
here is imported by ``server.settings`` except the pure ``identity`` and ``config`` modules.
"""
