"""Channels: the public ways in beside the raw websocket protocol, on their own HTTP listener.

- ``http``: the listener (FastAPI under an embedded uvicorn), one error envelope, body and
  rate limits; channels add routers to ``create_channels_app``.
- ``widget``: ``/widget.js`` (the embeddable chat bubble) and its demo page.
- ``identity``: which sites and origins may open a widget conversation, and verified user ids.

The operator console keeps its own, operator-only listener (``server.console``). Nothing
here is imported by ``server.settings`` except the pure ``identity`` module.
"""
