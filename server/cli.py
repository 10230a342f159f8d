"""The ``learnloop`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from feedback import FeedbackStore, StoreError
from server import logs
from server.settings import Settings, SettingsError, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(
        args.config,
        data_dir=args.data_dir,
        overrides={
            "server": {"host": getattr(args, "host", None), "port": getattr(args, "port", None)},
            "model": {"name": getattr(args, "model", None)},
        },
    )
    logs.configure(settings.server.log_format, verbose=args.verbose)
    return settings


async def _with_store(settings: Settings, fn: Callable[[FeedbackStore], Awaitable[Any]]) -> Any:
    store = await FeedbackStore.open(settings.store_target, tombstone_path=settings.tombstone_path)
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
    from server.trainer import cycle_config, describe
    from training.cycle import CycleStatus, TrainingCycle
    from training.models import resolve_model

    settings = _settings(args)
    base_model = resolve_model(settings.model.name)

    async def run(store: FeedbackStore) -> Any:
        await store.versions.ensure_base(base_model)
        return await TrainingCycle(store, cycle_config(settings, base_model)).run(force=args.force)

    result = asyncio.run(_with_store(settings, run))
    print(json.dumps(describe(result), indent=2))
    return 1 if result.status is CycleStatus.FAILED else 0


def cmd_correct(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def run(store: FeedbackStore) -> Any:
        return await store.conversations.add_correction(
            message_id=args.message_id, text=args.text, operator=args.operator
        )

    correction = asyncio.run(_with_store(settings, run))
    print(f"correction {correction.id} stored for message {correction.message_id}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    versions = asyncio.run(_with_store(_settings(args), lambda s: s.versions.all()))
    print(f"{'version':<10}{'state':<13}{'parent':<10}{'created':<21}gate")
    for v in versions:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
        print(f"{v.name:<10}{v.state:<13}{v.parent or '-':<10}{created:<21}{'; '.join(v.gate_reasons)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    runs = asyncio.run(_with_store(_settings(args), lambda s: s.runs.recent()))
    print(f"{'run':<6}{'state':<11}{'version':<9}{'started':<21}progress / detail")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at))
        p = r.progress or {}
        progress = f"step {p.get('step')}/{p.get('max_steps')} loss {p.get('loss', 0):.4f}" if p else ""
        print(f"{r.id:<6}{r.state:<11}{r.version or '-':<9}{started:<21}{progress} {(r.detail or '')[:120]}")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    result = asyncio.run(_with_store(_settings(args), lambda s: s.erasure.erase_user(args.user, actor=args.operator)))
    print(json.dumps(result, indent=2))
    if result["versions_trained_on_them"]:
        print("these model versions were trained on the erased data: " + ", ".join(result["versions_trained_on_them"]))
    return 0


def cmd_exclude(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.undo:
        asyncio.run(
            _with_store(settings, lambda s: s.conversations.include_message(args.message_id, operator=args.operator))
        )
        print(f"message {args.message_id} may train again")
    else:
        asyncio.run(
            _with_store(
                settings,
                lambda s: s.conversations.exclude_message(args.message_id, reason=args.reason, operator=args.operator),
            )
        )
        print(f"message {args.message_id} and every row built on it are kept out of training")
    return 0


def cmd_raters(args: argparse.Namespace) -> int:
    from feedback import RaterState

    settings = _settings(args)
    if args.action in ("approve", "reject"):
        if not args.rater:
            raise SystemExit("learnloop raters approve|reject RATER")
        state = RaterState.APPROVED if args.action == "approve" else RaterState.REJECTED
        asyncio.run(_with_store(settings, lambda s: s.raters.review(args.rater, state, reviewer=args.operator)))
        print(f"rater {args.rater}: {state}")
        return 0
    reviews = asyncio.run(_with_store(settings, lambda s: s.raters.reviews()))
    print(f"{'rater':<32}{'state':<10}{'ratings':>8}  reasons")
    for r in reviews:
        print(f"{r['rater']:<32}{r['state']:<10}{r['n_ratings']:>8}  {'; '.join(r['reasons'])}")
    return 0


def cmd_takeover(args: argparse.Namespace) -> int:
    import uuid

    async def run(store: FeedbackStore) -> Any:
        return await store.conversations.add_operator_reply(
            conversation_id=args.conversation_id, text=args.text, operator=args.operator, message_id=uuid.uuid4().hex
        )

    message = asyncio.run(_with_store(_settings(args), run))
    print(f"operator reply {message.id} stored; it trains as a demonstration")
    return 0


def _read_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise SettingsError("the passwords differ")
    return first


def cmd_operator(args: argparse.Namespace) -> int:
    settings = _settings(args)
    command = args.operator_command
    if command == "list":
        operators = asyncio.run(_with_store(settings, lambda s: s.accounts.operators()))
        for o in operators:
            print(f"{o.name:<24}{o.role:<10}{'disabled' if o.disabled else ''}")
        return 0
    if command == "add":
        password = _read_password(args)
        asyncio.run(
            _with_store(settings, lambda s: s.accounts.add_operator(args.name, password, args.role, actor="cli"))
        )
        print(f"operator {args.name} ({args.role}) created")
        return 0
    if command == "token":
        token = asyncio.run(
            _with_store(settings, lambda s: s.accounts.create_token(args.name, label=args.label, actor="cli"))
        )
        print(token)
        return 0
    new_password = _read_password(args) if args.password_stdin else None
    disabled = True if args.disable else False if args.enable else None
    asyncio.run(
        _with_store(
            settings,
            lambda s: s.accounts.set_operator(
                args.name, actor="cli", password=new_password, role=args.role, disabled=disabled
            ),
        )
    )
    print(f"operator {args.name} changed")
    return 0


def cmd_apikey(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.apikey_command == "create":
        print(asyncio.run(_with_store(settings, lambda s: s.api_keys.create(args.name, actor="cli"))))
        return 0
    if args.apikey_command == "revoke":
        revoked = asyncio.run(_with_store(settings, lambda s: s.api_keys.revoke(args.name, actor="cli")))
        print(f"{revoked} key(s) of {args.name} revoked")
        return 0
    for info in asyncio.run(_with_store(settings, lambda s: s.api_keys.names())):
        print(f"{info.name:<24}{info.keys} key(s)")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from server.trainer import cycle_config
    from training.cycle import prepare
    from training.pairs import Row

    settings = _settings(args)
    config = cycle_config(settings, settings.model.name)
    if args.dataset_command == "preview":
        snapshot = asyncio.run(_with_store(settings, lambda s: s.conversations.export_feedback()))
        print(json.dumps(prepare(snapshot, config).summary(rows=args.rows), indent=2, ensure_ascii=False))
        return 0

    async def show(store: FeedbackStore) -> Any:
        return await store.versions.get(args.version), await store.conversations.export_feedback()

    version, snapshot = asyncio.run(_with_store(settings, show))
    report = version.eval_report or {}
    used = version.feedback_ids
    lineage: dict[str, Any] = {
        "version": version.name,
        "state": str(version.state),
        "parent": version.parent,
        "dataset_id": report.get("dataset_id"),
        "trained_on": {k: len(v) for k, v in used.items()},
        "counts": report.get("counts"),
        "trust": report.get("trust"),
        "cleaning": report.get("cleaning"),
        "feedback_ids": used,
    }
    if args.rows:
        rows = prepare(snapshot, config).data
        keep = {k: set(v) for k, v in used.items()}

        def in_version(refs: Any) -> bool:
            return (
                set(refs.messages) <= keep.get("messages", set())
                and set(refs.ratings) <= keep.get("ratings", set())
                and set(refs.corrections) <= keep.get("corrections", set())
            )

        all_rows: tuple[Row, ...] = (*rows.dpo, *rows.kto, *rows.sft)
        lineage["rows_still_in_store"] = [r.to_trl() for r in all_rows if in_version(r.refs)]
    print(json.dumps(lineage, indent=2, ensure_ascii=False))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from feedback import VersionState

    async def run(store: FeedbackStore) -> Any:
        return await store.versions.set_state(
            args.version, VersionState.LIVE, actor=args.operator, reasons=[f"promoted by {args.operator}"]
        )

    version = asyncio.run(_with_store(_settings(args), run))
    print(f"{version.name} is live; running servers switch within schedule.version_poll_s")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    async def run(store: FeedbackStore) -> Any:
        name = args.version or (await store.versions.live()).name
        return await store.versions.rollback(name, actor=args.operator, reasons=[f"rolled back by {args.operator}"])

    live = asyncio.run(_with_store(_settings(args), run))
    print(f"rolled back; {live.name} is live")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    asked = asyncio.run(_with_store(_settings(args), lambda s: s.runs.request_cancel(args.run_id, actor=args.operator)))
    print(f"run {args.run_id}: " + ("cancelling" if asked else "not running"))
    return 0 if asked else 1


def cmd_outbox(args: argparse.Namespace) -> int:
    """Calls to IM platforms: pending, delivered, failed (given up or refused), and retrying failed ones."""
    from feedback.outbox import OutboxState

    settings = _settings(args)
    if args.action == "retry":
        if not args.ids:
            raise SystemExit("learnloop outbox retry ID [ID ...]")
        count = asyncio.run(_with_store(settings, lambda s: s.outbox.requeue(args.ids)))
        print(f"{count} failed row(s) queued again; a running server delivers them within seconds")
        return 0 if count == len(args.ids) else 1
    state = None if args.state == "all" else OutboxState(args.state)

    async def read(store: FeedbackStore) -> Any:
        return await store.outbox.counts(), await store.outbox.rows(state=state, limit=args.limit)

    counts, rows = asyncio.run(_with_store(settings, read))
    print("outbox: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    print(f"{'id':<7}{'state':<10}{'channel/site':<24}{'method':<24}{'tries':>5}  {'created':<20}last error")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
        where = f"{r.channel}/{r.site}"
        print(
            f"{r.id:<7}{r.state:<10}{where:<24}{r.method:<24}{r.attempts:>5}  {created:<20}{(r.last_error or '')[:100]}"
        )
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

    p = sub.add_parser("erase", help="erase a user's conversations and feedback for good")
    p.add_argument("--user", required=True)
    p.add_argument("--operator", default="cli")
    p.set_defaults(fn=cmd_erase)

    p = sub.add_parser("exclude", help="keep a message (and rows built on it) out of training")
    p.add_argument("message_id")
    p.add_argument("--reason", default="excluded by an operator")
    p.add_argument("--undo", action="store_true", help="let it train again")
    p.add_argument("--operator", default="cli")
    p.set_defaults(fn=cmd_exclude)

    p = sub.add_parser("raters", help="raters held for review: list, approve or reject")
    p.add_argument("action", nargs="?", choices=["list", "approve", "reject"], default="list")
    p.add_argument("rater", nargs="?")
    p.add_argument("--operator", default="cli")
    p.set_defaults(fn=cmd_raters)

    p = sub.add_parser("takeover", help="answer in a conversation as an operator (trains as a demonstration)")
    p.add_argument("conversation_id")
    p.add_argument("text")
    p.add_argument("--operator", default="cli")
    p.set_defaults(fn=cmd_takeover)

    p = sub.add_parser("dataset", help="what the next run would train on, or what trained a version")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    pp = dsub.add_parser("preview", help="counts per signal, and what was dropped or held and why")
    pp.add_argument("--rows", action="store_true", help="print the training rows too")
    pp.set_defaults(fn=cmd_dataset)
    pp = dsub.add_parser("show", help="lineage of a model version")
    pp.add_argument("version")
    pp.add_argument("--rows", action="store_true", help="print the rows rebuilt from the store")
    pp.set_defaults(fn=cmd_dataset)

    p = sub.add_parser("promote", help="make a version live now (by hand)")
    p.add_argument("version")
    p.add_argument("--operator", default="cli")
    p.set_defaults(fn=cmd_promote)

    p = sub.add_parser("rollback", help="take the canary or the live version out of service")
    p.add_argument("version", nargs="?", help="default: the live version (its predecessor goes live again)")
    p.add_argument("--operator", default="cli")
    p.set_defaults(fn=cmd_rollback)

    p = sub.add_parser("cancel", help="cancel a running training run")
    p.add_argument("run_id", type=int)
    p.add_argument("--operator", default="cli")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("operator", help="console accounts: add, change, list, API tokens")
    osub = p.add_subparsers(dest="operator_command", required=True)
    pp = osub.add_parser("add", help="create an operator (asks for the password unless --password-stdin)")
    pp.add_argument("name")
    pp.add_argument("--role", choices=["viewer", "reviewer", "admin"], default="viewer")
    pp.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    pp.set_defaults(fn=cmd_operator)
    pp = osub.add_parser("set", help="change an operator's role or password, or lock/unlock the account")
    pp.add_argument("name")
    pp.add_argument("--role", choices=["viewer", "reviewer", "admin"])
    pp.add_argument("--password-stdin", action="store_true", help="read a new password from standard input")
    pp.add_argument("--disable", action="store_true", help="lock the account (ends its sessions and tokens)")
    pp.add_argument("--enable", action="store_true")
    pp.set_defaults(fn=cmd_operator)
    pp = osub.add_parser("token", help="create an API token (printed once)")
    pp.add_argument("name")
    pp.add_argument("--label", default="api")
    pp.set_defaults(fn=cmd_operator)
    osub.add_parser("list", help="list operators").set_defaults(fn=cmd_operator)

    p = sub.add_parser("apikey", help="keys of the OpenAI-compatible API: create (printed once), list, revoke")
    asub = p.add_subparsers(dest="apikey_command", required=True)
    pp = asub.add_parser("create", help="a new key for NAME (its conversations' site); printed once")
    pp.add_argument("name")
    pp.set_defaults(fn=cmd_apikey)
    pp = asub.add_parser("revoke", help="revoke every key of NAME (its conversations stay)")
    pp.add_argument("name")
    pp.set_defaults(fn=cmd_apikey)
    asub.add_parser("list", help="key names and how many keys each has").set_defaults(fn=cmd_apikey)

    p = sub.add_parser("outbox", help="calls to IM platforms (Telegram, Slack, webhooks): list, retry failed ones")
    p.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    p.add_argument("ids", nargs="*", type=int, help="retry: the failed rows to queue again")
    p.add_argument("--state", choices=["pending", "delivered", "failed", "all"], default="failed")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=cmd_outbox)

    sub.add_parser("versions", help="list model versions").set_defaults(fn=cmd_versions)
    sub.add_parser("runs", help="list training runs").set_defaults(fn=cmd_runs)
    sub.add_parser("config", help="print the resolved settings").set_defaults(fn=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("text", verbose=args.verbose)  # until the settings say otherwise
    try:
        return int(args.fn(args))
    except (SettingsError, StoreError, ValueError) as exc:
        print(f"learnloop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
