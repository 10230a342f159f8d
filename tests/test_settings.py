"""Settings: defaults < TOML < environment < overrides; unknown keys are errors; all documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import SettingsError, documented_fields, load_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults_need_no_file() -> None:
    s = load_settings(env={})
    assert (s.server.host, s.server.port, s.model.name) == ("127.0.0.1", 8765, "smollm2-135m-instruct")
    assert s.db_path == Path("learnloop-data/learnloop.db")


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "l.toml"
    cfg.write_text('data_dir = "/srv/a"\n[server]\nport = 9000\nhost = "0.0.0.0"\n[training]\nmax_steps = 5\n')
    s = load_settings(cfg, env={"LEARNLOOP_SERVER_PORT": "9100", "LEARNLOOP_GATE_MIN_HELDOUT_PAIRS": "3"})
    assert (s.server.port, s.server.host, s.training.max_steps, s.gate.min_heldout_pairs) == (9100, "0.0.0.0", 5, 3)
    assert s.data_dir == Path("/srv/a")
    s = load_settings(cfg, env={"LEARNLOOP_DATA_DIR": "/srv/b"}, overrides={"server": {"port": 1}})
    assert (s.server.port, s.data_dir) == (1, Path("/srv/b"))
    assert load_settings(cfg, env={}, data_dir="/srv/c").data_dir == Path("/srv/c")


def test_env_types() -> None:
    s = load_settings(
        env={
            "LEARNLOOP_SCHEDULE_ENABLED": "false",
            "LEARNLOOP_MODEL_SYSTEM_PROMPT": "Be kind.",
            "LEARNLOOP_SERVER_TOKEN": "",
            "LEARNLOOP_TRAINING_TARGET_MODULES": "q_proj, v_proj",
            "LEARNLOOP_TRAINING_LEARNING_RATE": "1e-4",
        }
    )
    assert s.schedule.enabled is False and s.model.system_prompt == "Be kind." and s.server.token is None
    assert s.training.target_modules == ("q_proj", "v_proj") and s.training.learning_rate == 1e-4


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LEARNLOOP_SERVER_PORTT": "1"}, "unknown setting"),
        ({"LEARNLOOP_NOPE_X": "1"}, "unknown environment setting"),
        ({"LEARNLOOP_SERVER_PORT": "eighty"}, "not a valid int"),
        ({"LEARNLOOP_SCHEDULE_ENABLED": "maybe"}, "not a valid bool"),
        ({"LEARNLOOP_TRAINING_LEARNING_RATE": "3"}, "out of range"),
        ({"LEARNLOOP_MODEL_DTYPE": "int4"}, "bfloat16 or float32"),
        ({"LEARNLOOP_TRAINING_CONTRAST_PICK": "random"}, "use one of hash, live"),
    ],
)
def test_bad_values_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env=env)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(bad, env={})
    typo = tmp_path / "typo.toml"
    typo.write_text("[servre]\nport = 1\n")
    with pytest.raises(SettingsError, match="unknown top-level"):
        load_settings(typo, env={})


def test_every_setting_has_help_and_is_in_the_readme() -> None:
    readme = README.read_text()
    for key, _default, help_text in documented_fields():
        assert help_text, f"{key} has no help text"
        assert f"`{key}`" in readme, f"{key} is not documented in the README's configuration table"


def test_example_config_is_valid() -> None:
    example = README.parent / "deploy" / "learnloop.toml"
    s = load_settings(example, env={})
    assert s.server.host == "0.0.0.0" and s.gate.min_heldout_pairs == 2
