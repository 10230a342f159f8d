"""Erasure reaches the model (docs/reliability.md, scenario 15): through the console's REST API, audit-logged;
versions trained on the erased user are marked; a retrain starts when one of them serves; the adapter
files of such a version are deleted once it no longer serves (never while it is live or the canary)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from feedback import FeedbackStore, ModelVersion, VersionState
from server.app import App
from server.release import erased_adapters_to_delete
from tests.console_support import bearer, running_app, stored_conversation
from tests.store_backends import StoreTarget
from tests.test_engine import make_adapter
from training.validate import ADAPTER_FILE, sha256_file


async def register(store: FeedbackStore, adapter: Path, messages: list[str]) -> str:
    version = await store.versions.register(
        adapter_path=str(adapter),
        sha256=sha256_file(adapter / ADAPTER_FILE),
        parent="base",
        base_model="tiny",
        eval_report={},
        feedback_ids={"messages": messages},
        training_run_id=None,
    )
    return version.name


def versions(*specs: tuple[str, float | None, float | None]) -> list[ModelVersion]:
    return [
        ModelVersion(
            name=n, seq=i, state=VersionState.RETIRED, adapter_path=f"/a/{n}", sha256="x", parent=None,
            base_model=None, trained_on_erased=t, adapter_deleted=d,
        )
        for i, (n, t, d) in enumerate(specs)
    ]  # fmt: skip


def test_which_adapters_go() -> None:
    vs = versions(("base", None, None), ("v1", 1.0, None), ("v2", 1.0, None), ("v3", None, None), ("v4", 1.0, 2.0))
    names = [v.name for v in erased_adapters_to_delete(vs, live="v2", canary=None)]
    assert names == ["v1"]  # v2 serves, v3 learned nothing erased, v4's files are gone already
    assert [v.name for v in erased_adapters_to_delete(vs, live="v3", canary="v1")] == ["v2"]


async def erase(app: App, user: str) -> dict[str, Any]:
    assert app.store is not None and app.console_port is not None
    token = await app.store.accounts.create_token("alice", label="ops", actor="test")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.console_port}") as http:
        assert (await http.post("/api/v1/erasures", json={"user": user})).status_code == 401
        viewer = await app.store.accounts.create_token("vic", label="ops", actor="test")
        assert (await http.post("/api/v1/erasures", json={"user": user}, headers=bearer(viewer))).status_code == 403
        response = await http.post("/api/v1/erasures", json={"user": user}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_erasure_marks_versions_deletes_superseded_adapters_and_retrains(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with running_app(tiny_model, tmp_path) as app:
        store = app.store
        assert store is not None and app.release is not None
        _, mallory_ids = await stored_conversation(store, [("user", "my secret"), ("assistant", "noted")], user="erin")
        _, other_ids = await stored_conversation(store, [("user", "shipping?"), ("assistant", "3 days")], user="olaf")
        # what a retrain learns from once the erased users are gone
        await store.conversations.add_correction(message_id=other_ids[1], text="3 to 5 business days.", operator="op")
        a1 = make_adapter(tiny_model, tmp_path / "a1", seed=1)
        a2 = make_adapter(tiny_model, tmp_path / "a2", seed=2)
        v1 = await register(store, a1, mallory_ids)  # learned from erin
        v2 = await register(store, a2, other_ids)
        await app.release.promote(v1, actor="test")
        await app.release.promote(v2, actor="test")
        assert app.release.previous_live == v1 and app.engine is not None and app.engine.has_version(v1)

        result = await erase(app, "erin")
        assert result["versions_trained_on_them"] == [v1] and result["retrain_started"] is False
        assert (await store.versions.get(v1)).trained_on_erased is not None
        assert (await store.versions.get(v2)).trained_on_erased is None
        assert [v.name for v in await store.versions.erased_with_files()] == [v1]  # what the release's poll reads
        audit = await store.browse.audit_log(limit=10)
        assert any(e["action"] == "erase" and e["actor"] == "alice" for e in audit)

        await app.release.sync()
        assert not a1.exists() and a2.exists()  # v1 serves no one: its files are gone, v2's stay
        assert (await store.versions.get(v1)).adapter_deleted is not None
        assert not app.engine.has_version(v1) and app.release.previous_live is None  # no rollback to it
        assert await store.versions.erased_with_files() == []  # done: the next polls read nothing

        # erasing a user the live version learned from: marked, kept while it serves, and a run starts
        _, live_ids = await stored_conversation(store, [("user", "hi"), ("assistant", "hello")], user="liv")
        await store.db.write(
            lambda conn: conn.execute(
                "UPDATE model_versions SET feedback_ids = ? WHERE name = ?", (f'{{"messages": ["{live_ids[1]}"]}}', v2)
            )
        )
        result = await erase(app, "liv")
        assert result["versions_trained_on_them"] == [v2] and result["retrain_started"] is True
        await app.release.sync()
        assert a2.exists() and app.release.live_version == v2  # still live: replaced by the retrain first
        for _ in range(1500):
            runs = await store.runs.recent()
            if runs and runs[0].finished_at is not None:
                break
            await asyncio.sleep(0.2)
        assert runs and runs[0].finished_at is not None, runs  # the retrain ran (its outcome is the gate's)


def test_a_rollback_needs_somewhere_to_go() -> None:
    from feedback.versions import rollback_refusal
    from server.release import rollback_target

    def v(name: str, state: VersionState, replaced: str | None = None, deleted: float | None = None) -> ModelVersion:
        return ModelVersion(
            name=name, seq=0, state=state, adapter_path=None, sha256=None, parent=None, base_model=None,
            replaced=replaced, adapter_deleted=deleted,
        )  # fmt: skip

    by_name = {
        "base": v("base", VersionState.RETIRED),
        "v1": v("v1", VersionState.RETIRED, deleted=5.0),
        "v2": v("v2", VersionState.LIVE, replaced="v1"),
        "v3": v("v3", VersionState.CANARY),
    }
    assert rollback_refusal("base", None, None) is not None
    assert rollback_target(v("base", VersionState.LIVE), by_name) is None  # base is the model itself
    assert rollback_target(v("v4", VersionState.LIVE, replaced=None), by_name) == "base"
    assert (
        rollback_target(v("v5", VersionState.LIVE, replaced="v4"), by_name | {"v4": v("v4", VersionState.RETIRED)})
        == "v4"
    )
    assert rollback_target(by_name["v2"], by_name) is None  # v1's adapter is gone
    assert rollback_target(by_name["v3"], by_name) == "v2"  # a canary hands back to live
    assert rollback_target(by_name["v1"], by_name) is None  # retired: not serving, nothing to take out


async def test_the_store_refuses_a_rollback_to_nowhere(store_target: StoreTarget) -> None:
    from feedback import InvalidError

    store = await store_target.open()
    try:
        await store.versions.ensure_base("tiny")
        names = []
        for i in (1, 2):
            v = await store.versions.register(
                adapter_path=f"/a/v{i}", sha256="x", parent="base", base_model="tiny", eval_report={},
                feedback_ids={}, training_run_id=None,
            )  # fmt: skip
            await store.versions.set_state(v.name, VersionState.LIVE, actor="test")
            names.append(v.name)
        v1, v2 = names
        await store.versions.adapter_deleted(v1, actor="erasure")  # v2 replaced v1, whose files are gone
        try:
            await store.versions.rollback(v2, actor="test")
        except InvalidError as exc:
            assert exc.code == "conflict" and f"{v1} was trained on erased data" in exc.message
        else:
            raise AssertionError(f"rolling back {v2} went through")
        assert (await store.versions.live()).name == v2  # nothing moved
        await store.versions.set_state("base", VersionState.LIVE, actor="test")
        await store.versions.set_state(v2, VersionState.LIVE, actor="test")  # now v2 replaced base
        assert (await store.versions.rollback(v2, actor="test")).name == "base"
    finally:
        await store.close()
