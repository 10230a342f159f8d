"""The ``learnloop`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from feedback import FeedbackStore, StoreError
from server.settings import Settings, SettingsError, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        args.config,
        data_dir=args.data_dir,
        overrides={
            "server": {"host": getattr(args, "host", None), "port": getattr(args, "port", None)},
            "model": {"name": getattr(args, "model", None)},
        },
    )


async def _with_store(settings: Settings, fn: Callable[[FeedbackStore], Awaitable[Any]]) -> Any:
    store = await FeedbackStore.open(settings.db_path)
    try:
        return await fn(store)
    finally:
        await store.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import serve_forever

    asyncio.run(serve_forever(_settings(args)))
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    from training.models import resolve_model

    path = resolve_model(_settings(args).model.name)
    print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from server.app import cycle_config, describe
    from training.cycle import CycleStatus, TrainingCycle
    from training.models import resolve_model

    settings = _settings(args)
    base_model = resolve_model(settings.model.name)

    async def run(store: FeedbackStore) -> Any:
        await store.ensure_base_version(base_model)
        return await TrainingCycle(store, cycle_config(settings, base_model)).run(force=args.force)

    result = asyncio.run(_with_store(settings, run))
    print(json.dumps(describe(result), indent=2))
    return 1 if result.status is CycleStatus.FAILED else 0


def cmd_correct(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def run(store: FeedbackStore) -> Any:
        return await store.add_correction(message_id=args.message_id, text=args.text, operator=args.operator)

    correction = asyncio.run(_with_store(settings, run))
    print(f"correction {correction.id} stored for message {correction.message_id}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    versions = asyncio.run(_with_store(_settings(args), lambda s: s.list_versions()))
    print(f"{'version':<10}{'state':<13}{'parent':<10}{'created':<21}gate")
    for v in versions:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
        print(f"{v.name:<10}{v.state:<13}{v.parent or '-':<10}{created:<21}{'; '.join(v.gate_reasons)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    runs = asyncio.run(_with_store(_settings(args), lambda s: s.list_runs()))
    print(f"{'run':<6}{'state':<11}{'version':<9}{'started':<21}progress / detail")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at))
        p = r.progress or {}
        progress = f"step {p.get('step')}/{p.get('max_steps')} loss {p.get('loss', 0):.4f}" if p else ""
        print(f"{r.id:<6}{r.state:<11}{r.version or '-':<9}{started:<21}{progress} {(r.detail or '')[:120]}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    settings = _settings(args)
    print(json.dumps(dataclasses.asdict(settings), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learnloop", description="A chat-agent backend that learns from its users.")
    parser.add_argument("--config", help="TOML config file (default: $LEARNLOOP_CONFIG)")
    parser.add_argument("--data-dir", help="overrides data_dir")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the websocket chat server (and the training schedule)")
    p.add_argument("--model", help="base model: alias, local folder or hub id")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("model", help="manage the base model")
    msub = p.add_subparsers(dest="model_command", required=True)
    pp = msub.add_parser("pull", help="fetch and convert the base model into the cache")
    pp.add_argument("--model")
    pp.set_defaults(fn=cmd_model_pull)

    p = sub.add_parser("train", help="run one training cycle now against the store")
    p.add_argument("--force", action="store_true", help="train even with less new feedback than the threshold")
    p.add_argument("--model")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("correct", help="store an operator's better answer for a reply")
    p.add_argument("message_id")
    p.add_argument("text")
    p.add_argument("--operator", default="cli")
    p.set_defaults(fn=cmd_correct)

    sub.add_parser("versions", help="list model versions").set_defaults(fn=cmd_versions)
    sub.add_parser("runs", help="list training runs").set_defaults(fn=cmd_runs)
    sub.add_parser("config", help="print the resolved settings").set_defaults(fn=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "apscheduler.executors.default"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.fn(args))
    except (SettingsError, StoreError) as exc:
        print(f"learnloop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
