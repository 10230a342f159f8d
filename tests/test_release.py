"""The release rules that need no engine or store: what stays loaded, where a rollback goes."""

from __future__ import annotations

from server.release import adapters_to_unload, demoted, previous_live_after


def test_base_live_canary_and_previous_live_stay_loaded() -> None:
    loaded = {"base", "v1", "v2", "v3", "v4"}
    assert adapters_to_unload(loaded, live="v3", canary="v4", previous_live="v2") == ["v1"]


def test_nothing_to_keep_but_live_after_a_rollback_of_the_canary() -> None:
    assert adapters_to_unload({"base", "v1", "v2"}, live="v1", canary=None, previous_live=None) == ["v2"]


def test_unloading_is_sorted_and_never_touches_base() -> None:
    loaded = {"base", "v9", "v10", "v2"}
    assert adapters_to_unload(loaded, live="base", canary=None, previous_live=None) == ["v10", "v2", "v9"]


def test_a_promotion_remembers_the_live_version_it_replaced() -> None:
    assert previous_live_after("v1", "v2", None) == "v1"
    assert previous_live_after("v2", "v2", "v1") == "v1"  # no change: the rollback target stays
    assert previous_live_after("v2", "v1", "v1") == "v2"  # rolled back to v1: v2 is now the one to go back to


def test_every_version_but_live_and_the_canary_is_demoted() -> None:
    """Their replies not started yet start on live (``Engine.redirect``): after a rollback the
    version rolled back, after a promotion the one it replaced, and base once an adapter serves."""
    loaded = {"base", "v1", "v2", "v3"}
    assert demoted(loaded, live="v2", canary="v3") == ["base", "v1"]  # v3 rolled back to v2 next
    assert demoted(loaded, live="v2", canary=None) == ["base", "v1", "v3"]
    assert demoted({"base"}, live="base", canary=None) == []
