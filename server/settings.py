"""Settings: read once, in one place. Defaults < TOML file < environment < command line.

The file (``--config PATH`` or ``$LEARNLOOP_CONFIG``) has a top-level ``data_dir``, the sections
``[server]``, ``[store]``, ``[model]``, ``[schedule]``, ``[training]``, ``[gate]``, ``[trust]``, ``[implicit]``,
``[canary]``, ``[console]``, ``[channels]`` and ``[outbox]``, and named tables: one per widget site
(``[sites.shop]``), Telegram bot (``[telegram.support]``), Slack app (``[slack.support]``) and
signed-webhook sender (``[webhooks.helpdesk]``). Every key can be set from the environment as
``LEARNLOOP_<SECTION>_<KEY>`` (upper case), for example ``LEARNLOOP_SERVER_PORT=9000`` or
``LEARNLOOP_TRAINING_MAX_STEPS=20``; a named table's keys as ``LEARNLOOP_<TABLE>__<NAME>__<KEY>``
(double underscores: ``LEARNLOOP_SITES__SHOP__ORIGINS=https://a.example,https://b.example``,
``LEARNLOOP_TELEGRAM__SUPPORT__TOKEN=...``); the top-level ``data_dir`` is ``LEARNLOOP_DATA_DIR``.
Unknown keys are errors, not ignored.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback.exceptions import ErrorCode, LearnloopError
from server.admission import proxy_networks
from server.channels.config import (
    SITE_NAME,
    ChannelsConfig,
    OutboxConfig,
    SiteConfig,
    SlackConfig,
    TelegramConfig,
    WebhookConfig,
)
from server.channels.identity import normalize_origin
from server.secret import Secret
from training.canary import CanaryConfig
from training.config import TrainConfig
from training.gate import GateConfig
from training.implicit import ImplicitConfig
from training.models import DEFAULT_MODEL
from training.trust import TrustConfig

GGUF_QUANTS = ("", "q8_0", "q4_0", "q5_0", "iq4_nl")
"""``model.gguf_quant``: serve the file as it is, or one of ``server.engines.QUANT_TYPES``."""


class SettingsError(LearnloopError, ValueError):
    """A setting is unknown or has a value of the wrong type."""

    code = ErrorCode.BAD_REQUEST
    public = True


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "Address the websocket gateway listens on."})
    port: int = field(default=8765, metadata={"help": "Port of the websocket gateway (0 picks a free one)."})
    token: str | None = field(
        default=None,
        metadata={
            "help": "If set, a websocket handshake must carry it (Authorization: Bearer TOKEN, or from a browser "
            "the subprotocol learnloop.bearer.BASE64URL(TOKEN) beside learnloop.v1); a missing or wrong one gets "
            "HTTP 401 before a session exists. Only a widget page of a [sites.NAME] origin may come without it."
        },
    )
    max_frame_bytes: int = field(default=65536, metadata={"help": "Largest websocket frame accepted."})
    max_text_chars: int = field(default=4000, metadata={"help": "Longest user message, in characters."})
    rate_per_s: float = field(default=5.0, metadata={"help": "Sustained client frames per second per connection."})
    rate_burst: int = field(default=20, metadata={"help": "Frames a connection may send in a burst."})
    ratings_per_minute: float = field(
        default=30.0,
        metadata={
            "help": "Ratings one rater identity may send per minute, over all connections (and all server "
            "processes on a PostgreSQL store)."
        },
    )
    log_format: str = field(
        default="text",
        metadata={
            "help": "text (one readable line per event) or json (one JSON object per line, with conversation "
            "and version ids as fields; never message text)."
        },
    )
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Browser pages (origins such as https://app.example, comma-separated in env) allowed to open "
            "the websocket, besides every [sites.NAME]'s origins and the demo page's. A handshake from any other "
            "Origin, or Origin: null, gets HTTP 403 before a session exists."
        },
    )
    require_origin: bool = field(
        default=False,
        metadata={
            "help": "Refuse handshakes without an Origin header (403). Browsers always send one, so only "
            "non-browser clients (the Python client, scripts) lack it; off by default for them."
        },
    )
    open_timeout_s: float = field(
        default=10.0, metadata={"help": "A websocket handshake not completed within this many seconds is dropped."}
    )
    max_connections_per_address: int = field(
        default=100,
        metadata={"help": "Websockets open per client address; one more gets HTTP 429 + Retry-After (0 = no cap)."},
    )
    trusted_proxies: tuple[str, ...] = field(
        default=("127.0.0.0/8", "::1"),
        metadata={"help": "Proxies (IPs, CIDRs) whose X-Forwarded-For is read: its right-most entry not one counts."},
    )
    max_connections_per_user: int = field(
        default=16,
        metadata={
            "help": "Websockets open at once for one user: a site's verified user wherever they connect from, a "
            "plain hello.user (a claim) per client address; anonymous visitors count only per address. One more "
            "gets error rate_limited and close 1013 (0 = no cap)."
        },
    )
    idle_timeout_s: float = field(
        default=300.0,
        metadata={
            "help": "A websocket whose client sends no frame (a ping counts, a pong does not) for this long, "
            "and has no reply streaming, is closed with code 4408 (0 = never)."
        },
    )
    send_timeout_s: float = field(
        default=30.0,
        metadata={"help": "Drop a client that does not read once a frame waits this long to be sent (it sees 1006)."},
    )
    write_limit_bytes: int = field(
        default=32768, metadata={"help": "Bytes a connection may have waiting to be written before its sender waits."}
    )
    compression: bool = field(
        default=False,
        metadata={
            "help": "Offer permessage-deflate. Off: chat frames are small, and each compressed connection "
            "holds zlib buffers; when on, server.max_frame_bytes still bounds a message after decompression."
        },
    )
    ping_interval_s: float = field(
        default=20.0,
        metadata={
            "help": "The server pings each websocket this often; one whose pong does not come within "
            "server.ping_timeout_s is closed with 1011 (a dead peer)."
        },
    )
    ping_timeout_s: float = field(default=20.0, metadata={"help": "See server.ping_interval_s."})
    drain_s: float = field(
        default=5.0,
        metadata={
            "help": "On SIGTERM: seconds replies in flight may go on streaming; then they end with done "
            "(finish_reason 'shutdown'), are stored, and clients get close 1001."
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_connections_per_address", "max_connections_per_user", "idle_timeout_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"server.{name}: use 0 (off) or a positive number")
        for name in ("send_timeout_s", "write_limit_bytes", "ping_interval_s", "ping_timeout_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"server.{name}: use a positive number")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"server.log_format {self.log_format!r}: use text or json")
        normalized = []
        for origin in self.allowed_origins:
            n = normalize_origin(origin)
            if n is None:
                raise SettingsError(f"server.allowed_origins: {origin!r}: write scheme://host[:port]")
            normalized.append(n)
        object.__setattr__(self, "allowed_origins", tuple(normalized))
        try:
            proxy_networks(self.trusted_proxies)
        except ValueError as exc:
            raise SettingsError(f"server.trusted_proxies: {exc}") from None


ENGINES = ("auto", "transformers", "llamacpp", "openai")


@dataclass(frozen=True)
class ModelConfig:
    engine: str = field(
        default="auto",
        metadata={
            "help": "auto (llamacpp when llama-cpp-python imports and the model has a GGUF, else transformers; "
            "the server logs which and why), transformers (in process, continuous batching, LoRA per request), llamacpp (in process: "
            "the GGUF model.gguf through llama.cpp, continuous batching, LoRA per request) or openai (an "
            "OpenAI-compatible server such as vLLM: model.openai_url)."
        },
    )
    gguf: str | None = field(
        default=None, metadata={"help": "GGUF file for the llamacpp engine; default: the default model's GGUF."}
    )
    gguf_quant: str = field(
        default="q8_0",
        metadata={
            "help": "llamacpp: requantize model.gguf once to this type before serving (q8_0, q4_0, q5_0, iq4_nl; empty: serve "
            "the file as it is). Q4_1, the default model's file, prefills 2x slower than Q8_0 here "
            "(bench/RESULTS.md)."
        },
    )
    single_streams: int = field(
        default=1,
        metadata={
            "help": "llamacpp: while at most this many replies are in flight they decode on model.gguf_quant_single, "
            "the format fastest for one stream; more move to model.gguf_quant, which batches best (0: one format). "
            "Costs a second model and 2 + single_streams more KV sequences."
        },
    )
    gguf_quant_single: str = field(
        default="",
        metadata={
            "help": "llamacpp: the format of the single-stream lane (model.single_streams): empty serves the file as "
            "it is (Q4_1 for the default model: 1.16x Q8_0 alone, +1.3% perplexity against it), or q8_0, q4_0, q5_0, iq4_nl."
        },
    )
    llama_cpp_src: str | None = field(
        default=None,
        metadata={
            "help": "llamacpp: a llama.cpp checkout holding convert_lora_to_gguf.py (converts adapters); default: "
            "extracted once from the llama-cpp-python sdist."
        },
    )
    llama_cpp_sdist: str | None = field(
        default=None,
        metadata={
            "help": "llamacpp: the llama-cpp-python sdist (.tar.gz) to extract the converter from; default: pip "
            "downloads it once into the model cache."
        },
    )
    kv_reuse: bool = field(
        default=True,
        metadata={
            "help": "llamacpp: keep prompts' KV cells between replies (next turns, regenerations and new "
            "conversations prefill only what no cached prefix holds; flash attention off). Greedy replies "
            "equal full prefills' under the same schedule (README, KV reuse); false: full prefills."
        },
    )
    kv_resident: int = field(
        default=8,
        metadata={
            "help": "llamacpp: KV sequences kept beside the max_active ones for conversations between their turns "
            "and shared system prompts (0: reuse only what stays in the active slots). Each costs "
            "(max_prompt_tokens + max_new_tokens, rounded up to 256) cells x the model's bytes per cell: "
            "39.4 MiB for SmolLM2-135M at the defaults."
        },
    )
    llama_extra_bufts: bool | None = field(
        default=None,
        metadata={
            "help": "llamacpp: use llama.cpp's extra weight buffers (AMX, repacked layouts): true, false, or "
            "empty to probe the CPU once (some VMs advertise AMX but fault on it)."
        },
    )
    openai_url: str = field(
        default="http://127.0.0.1:8000/v1",
        metadata={"help": "Base URL of the OpenAI-compatible server (openai engine)."},
    )
    openai_replicas: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Base URLs of several replicas of the OpenAI-compatible server (openai engine; comma-separated "
            "in the environment); when set, model.openai_url is not used. Each replica loads every version "
            "(a version one of them refuses serves on none) and replies go to the replica with the fewest in "
            "flight. A load balancer's URL cannot hot-swap: a load call through it reaches one replica."
        },
    )
    openai_model: str | None = field(
        default=None, metadata={"help": "Model name the OpenAI-compatible server serves (default: model.name)."}
    )
    openai_api_key: str | None = field(
        default=None, metadata={"help": "Bearer token for that server, if it needs one."}
    )
    name: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Base model: 'smollm2-135m-instruct' (from PyPI), a local folder, or a hub id."},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Serving dtype: float32 or bfloat16 (float32 decodes faster on the CPUs measured, see bench)."
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply, in tokens."})
    max_prompt_tokens: int = field(
        default=1536, metadata={"help": "Longest prompt; older turns are dropped first (system prompt kept)."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt for every conversation (also used in training rows)."}
    )
    max_pending: int = field(
        default=64, metadata={"help": "Replies in progress or queued before new ones get 'overloaded'."}
    )
    max_active: int = field(
        default=16, metadata={"help": "Replies generated at once (one batch); the others wait in the queue."}
    )

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise SettingsError(f"model.engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.engine == "llamacpp" and self.gguf is None and self.name.lower() != DEFAULT_MODEL:
            raise SettingsError(
                f"model.gguf: the llamacpp engine serves a GGUF file; set it for model.name {self.name!r} "
                "(only the default model's GGUF is found by itself)"
            )
        if not 0 <= self.kv_resident <= 128:
            raise SettingsError(f"model.kv_resident {self.kv_resident}: use 0 to 128")
        if not 0 <= self.single_streams <= 4:
            raise SettingsError(f"model.single_streams {self.single_streams}: use 0 (one format) to 4")
        if self.gguf_quant_single not in GGUF_QUANTS:
            raise SettingsError(
                f"model.gguf_quant_single {self.gguf_quant_single!r}: use one of "
                f"{', '.join(q for q in GGUF_QUANTS if q)} or an empty string"
            )
        if self.gguf_quant not in GGUF_QUANTS:
            raise SettingsError(
                f"model.gguf_quant {self.gguf_quant!r}: use one of {', '.join(q for q in GGUF_QUANTS if q)} or an empty string"
            )
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise SettingsError(f"model.dtype {self.dtype!r}: use bfloat16 or float32")


STORE_SCHEMES = ("postgresql://", "postgres://", "sqlite:///")


@dataclass(frozen=True)
class StoreConfig:
    url: Secret | None = field(
        default=None,
        metadata={
            "help": "Where the feedback store lives. Unset: the SQLite file data_dir/learnloop.db (the default); "
            "postgresql://USER:PASSWORD@HOST:PORT/DBNAME: PostgreSQL (pip install 'learnloop[postgres]'; the "
            "schema is created and migrated at start-up); sqlite:///ABSOLUTE/PATH: another SQLite file. Never printed."
        },
    )

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.reveal().startswith(STORE_SCHEMES):
            raise SettingsError(f"store.url: use {', '.join(STORE_SCHEMES)}... or leave it unset")


@dataclass(frozen=True)
class ScheduleConfig:
    enabled: bool = field(default=True, metadata={"help": "Run the training cycle on a schedule inside the server."})
    interval_s: float = field(default=3600.0, metadata={"help": "Seconds between scheduled training checks."})
    min_new_feedback: int = field(
        default=10, metadata={"help": "New ratings, corrections, regenerations (implicit labels too) to start a run."}
    )
    heldout_fraction: float = field(default=0.2, metadata={"help": "Share of conversations held out for the gate."})
    timeout_s: float = field(default=3600.0, metadata={"help": "A training run longer than this is killed."})
    version_poll_s: float = field(
        default=5.0, metadata={"help": "How often the server checks the store for a newly promoted version."}
    )


@dataclass(frozen=True)
class ConsoleConfig:
    enabled: bool = field(default=True, metadata={"help": "Serve the operator console and REST API."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address of the console listener (loopback by default)."})
    port: int = field(default=8766, metadata={"help": "Port of the console (0 picks a free one)."})
    session_ttl_s: float = field(default=43200.0, metadata={"help": "A console login lasts this long."})
    secure_cookie: bool = field(
        default=False, metadata={"help": "Mark the session cookie Secure (set when the console is behind HTTPS)."}
    )
    login_attempts_per_minute: float = field(
        default=10.0,
        metadata={
            "help": "Login attempts allowed per minute per name and per client address (over all server "
            "processes on a PostgreSQL store)."
        },
    )


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(
        default=Path("learnloop-data"), metadata={"help": "Database, adapters and training runs live here."}
    )
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    telegram: dict[str, TelegramConfig] = field(default_factory=dict)
    slack: dict[str, SlackConfig] = field(default_factory=dict)
    webhooks: dict[str, WebhookConfig] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "learnloop.db"

    @property
    def store_target(self) -> str | Path:
        """What ``FeedbackStore.open`` takes: ``store.url`` when set, else the SQLite file ``db_path``."""
        return self.store.url.reveal() if self.store.url is not None else self.db_path

    @property
    def tombstone_path(self) -> Path:
        """The erasures file (hashes only), in ``data_dir`` whichever backend holds the store."""
        return self.data_dir / "learnloop.db.erasures"


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "store": StoreConfig,
    "model": ModelConfig,
    "schedule": ScheduleConfig,
    "training": TrainConfig,
    "gate": GateConfig,
    "trust": TrustConfig,
    "implicit": ImplicitConfig,
    "canary": CanaryConfig,
    "console": ConsoleConfig,
    "channels": ChannelsConfig,
    "outbox": OutboxConfig,
}

# named tables: [sites.shop], [telegram.support], ...; (record type, what a name names)
NAMED: dict[str, tuple[type, str]] = {
    "sites": (SiteConfig, "site"),
    "telegram": (TelegramConfig, "telegram bot"),
    "slack": (SlackConfig, "slack app"),
    "webhooks": (WebhookConfig, "webhook sender"),
}


def _cast(value: Any, annotation: Any, where: str) -> Any:
    """Cast a TOML or environment value to a field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("", "none", "null"))
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _cast(value, inner[0], where)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        return tuple(_cast(v.strip() if isinstance(v, str) else v, args[0], where) for v in items)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int and isinstance(value, float):
            raise ValueError(value)
        if annotation in (int, float, str, Path):
            return annotation(value)
        if annotation is Secret:
            return value if isinstance(value, Secret) else Secret(str(value))
    except (TypeError, ValueError):
        name = getattr(annotation, "__name__", str(annotation))
        raise SettingsError(f"{where}: {value!r} is not a valid {name}") from None
    raise SettingsError(f"{where}: unsupported type {annotation!r}")


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise SettingsError(
            f"unknown setting(s) in [{where}]: {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
        )
    kwargs = {k: _cast(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    data_dir: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Resolve settings from defaults, the TOML file, ``LEARNLOOP_*`` variables and ``overrides``."""
    env = os.environ if env is None else env
    path = path or env.get("LEARNLOOP_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    top_unknown = set(raw) - {"data_dir", *NAMED, *SECTIONS}
    if top_unknown:
        raise SettingsError(f"unknown top-level setting(s): {', '.join(sorted(top_unknown))}")
    sections: dict[str, dict[str, Any]] = {name: dict(raw.get(name, {})) for name in SECTIONS}
    named: dict[str, dict[str, dict[str, Any]]] = {table: {} for table in NAMED}
    for table in NAMED:
        for name, values in dict(raw.get(table, {})).items():
            if not isinstance(values, dict):
                raise SettingsError(f"{table}.{name}: write a table, [{table}.{name}]")
            named[table][name] = dict(values)
    resolved_dir: Any = raw.get("data_dir", Settings.data_dir)
    for key, value in env.items():
        if not key.startswith("LEARNLOOP_") or key in ("LEARNLOOP_CONFIG", "LEARNLOOP_CACHE"):
            continue
        rest = key[len("LEARNLOOP_") :].lower()
        if rest == "data_dir":
            resolved_dir = value
            continue
        found = next((t for t in NAMED if rest.startswith(t + "__")), None)
        if found is not None:
            name, _, table_key = rest[len(found) + 2 :].partition("__")
            if not table_key:
                example = {"sites": "SITES__SHOP__SECRET", "telegram": "TELEGRAM__SUPPORT__TOKEN"}.get(found, "")
                raise SettingsError(
                    f"{key}: write LEARNLOOP_{found.upper()}__<NAME>__<KEY>"
                    + (f", e.g. LEARNLOOP_{example}" if example else "")
                )
            named[found].setdefault(name, {})[table_key] = value
            continue
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise SettingsError(f"unknown environment setting {key}")
        sections[section][rest[len(section) + 1 :]] = value
    for section, values in (overrides or {}).items():
        sections[section].update({k: v for k, v in values.items() if v is not None})
    built = {name: _build(cls, sections[name], name) for name, cls in SECTIONS.items()}
    tables: dict[str, Any] = {table: _build_named(table, named[table]) for table in NAMED}
    return Settings(data_dir=Path(data_dir or resolved_dir), **built, **tables)


def _build_named(table: str, tables: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    cls, noun = NAMED[table]
    built = {}
    for name, values in tables.items():
        if not SITE_NAME.fullmatch(name):
            raise SettingsError(f"{noun} name {name!r}: use lower-case letters, digits, '-' and '_' (at most 64)")
        try:
            built[name] = _build(cls, values, f"{table}.{name}")
        except SettingsError as exc:
            raise SettingsError(str(exc).replace(f"{table}.NAME.", f"{table}.{name}.")) from None
    return built


def documented_fields() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every setting, for the README table and its test."""
    rows: list[tuple[str, Any, str]] = [
        ("data_dir", Settings.data_dir, "Database, adapters and training runs live here.")
    ]
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            rows.append((f"{name}.{f.name}", default, f.metadata.get("help", "")))
    rows += [
        (f"{table}.NAME.{f.name}", f.default, f.metadata.get("help", ""))
        for table, (cls, _) in NAMED.items()
        for f in dataclasses.fields(cls)
    ]
    return rows
