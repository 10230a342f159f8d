"""Settings: defaults < TOML < environment < overrides; unknown keys are errors; all documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Secret, SettingsError, documented_fields, load_settings

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
        ({"LEARNLOOP_TRAINING_REPLAY_SHARE": "1"}, r"training.replay_share 1.0: use 0 \(a fixed count\)"),
        ({"LEARNLOOP_TRAINING_REPLAY_CHAT": "/nowhere/replay.jsonl"}, "training.replay_chat '/nowhere/replay.jsonl'"),
        ({"LEARNLOOP_MODEL_GGUF_QUANT": "q2_k"}, "use one of q8_0, q4_0, q5_0, iq4_nl or an empty string"),
        ({"LEARNLOOP_GATE_JUDGE": "vibes"}, "use one of pairs, replies, both"),
        ({"LEARNLOOP_MODEL_SINGLE_STREAMS": "9"}, r"use 0 \(one format\) to 4"),
        ({"LEARNLOOP_MODEL_GGUF_QUANT_SINGLE": "q4_1"}, "model.gguf_quant_single 'q4_1': use one of q8_0"),
    ],
)
def test_bad_values_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env=env)


def test_every_served_gguf_format_can_be_made() -> None:
    from server.engines import QUANT_TYPES
    from server.settings import GGUF_QUANTS

    assert set(GGUF_QUANTS) == {"", *QUANT_TYPES}  # "" serves the file as it ships


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


def test_channels_defaults() -> None:
    c = load_settings(env={}).channels
    assert (c.enabled, c.host, c.port, c.max_body_bytes, c.demo) == (True, "127.0.0.1", 8767, 65536, True)
    assert c.requests_per_minute > 0
    with pytest.raises(SettingsError, match="max_body_bytes"):
        load_settings(env={"LEARNLOOP_CHANNELS_MAX_BODY_BYTES": "0"})


def test_sites_from_toml_and_env(tmp_path: Path) -> None:
    cfg = tmp_path / "l.toml"
    cfg.write_text(
        '[sites.shop]\norigins = ["https://Shop.example:443", "http://localhost:3000"]\n'
        'secret = "file-secret-0123456789"\n[sites.blog]\norigins = ["https://blog.example"]\n'
    )
    s = load_settings(cfg, env={})
    assert s.sites["shop"].origins == ("https://shop.example", "http://localhost:3000")
    assert s.sites["shop"].secret is not None and s.sites["shop"].secret.reveal() == "file-secret-0123456789"
    assert s.sites["blog"].secret is None
    s = load_settings(
        cfg,
        env={
            "LEARNLOOP_SITES__SHOP__SECRET": "env-secret-0123456789",
            "LEARNLOOP_SITES__NEW__ORIGINS": "https://a.example, https://b.example",
        },
    )
    assert s.sites["shop"].secret is not None and s.sites["shop"].secret.reveal() == "env-secret-0123456789"
    assert s.sites["shop"].origins == ("https://shop.example", "http://localhost:3000")  # the file's, kept
    assert s.sites["new"].origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LEARNLOOP_SITES__SHOP__ORIGINS": "https://shop.example/checkout"}, "scheme://host"),
        ({"LEARNLOOP_SITES__SHOP__SECRET": "short"}, "at least 16 characters"),
        ({"LEARNLOOP_SITES__SHOP__COLOR": "red"}, r"unknown setting\(s\) in \[sites.shop\]"),
        ({"LEARNLOOP_SITES__SHOP": "x"}, "LEARNLOOP_SITES__<NAME>__<KEY>"),
        ({"LEARNLOOP_SITES__SH.OP__ORIGINS": "https://a.example"}, "site name"),
    ],
)
def test_bad_sites_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env=env)


def test_secrets_never_print(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import main

    secret = "do-not-print-0123456789"
    s = load_settings(env={"LEARNLOOP_SITES__SHOP__SECRET": secret})
    assert secret not in repr(s) and secret not in str(s.sites["shop"].secret) and secret not in f"{s}"
    assert Secret(secret) == Secret(secret) and Secret(secret) != Secret(secret + "x")
    monkeypatch.setenv("LEARNLOOP_SITES__SHOP__SECRET", secret)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert secret not in out and '"secret": "********"' in out


WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_im_tables_from_toml_and_env(tmp_path: Path) -> None:
    cfg = tmp_path / "l.toml"
    cfg.write_text(
        '[telegram.support]\ntoken = "123:file"\nsecret_token = "file_secret-1"\n'
        '[slack.team]\nbot_token = "xoxb-1"\nsigning_secret = "s1gn-Z9q"\napi_base = "http://127.0.0.1:9/api"\n'
        f'[webhooks.helpdesk]\nsecret = "{WHSEC}"\noutbound_url = "https://helpdesk.example/in"\n'
        "[outbox]\nmax_age_s = 600\n"
    )
    s = load_settings(
        cfg,
        env={"LEARNLOOP_TELEGRAM__SUPPORT__TOKEN": "123:env", "LEARNLOOP_WEBHOOKS__HELPDESK__TOLERANCE_S": "60"},
    )
    bot = s.telegram["support"]
    assert bot.token is not None and bot.token.reveal() == "123:env"  # the environment wins
    assert bot.secret_token is not None and bot.secret_token.reveal() == "file_secret-1"
    assert (bot.api_base, bot.new_conversation_command, bot.edit_interval_ms) == (
        "https://api.telegram.org",
        "/start",
        1000,
    )
    assert s.slack["team"].api_base == "http://127.0.0.1:9/api"
    assert (s.webhooks["helpdesk"].outbound_url, s.webhooks["helpdesk"].tolerance_s) == (
        "https://helpdesk.example/in",
        60,
    )
    assert (s.outbox.max_age_s, s.outbox.min_backoff_s) == (600, 1.0)
    for secret in ("123:env", "file_secret-1", "s1gn-Z9q", WHSEC):
        assert secret not in repr(s)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LEARNLOOP_TELEGRAM__SUPPORT__TOKEN": "1:a"}, "telegram.support.secret_token is required"),
        (
            {"LEARNLOOP_TELEGRAM__SUPPORT__TOKEN": "1:a", "LEARNLOOP_TELEGRAM__SUPPORT__SECRET_TOKEN": "no spaces"},
            "A-Z, a-z, 0-9",
        ),
        ({"LEARNLOOP_SLACK__TEAM__BOT_TOKEN": "xoxb-1"}, "slack.team.signing_secret is required"),
        (
            {"LEARNLOOP_WEBHOOKS__H__SECRET": "plain", "LEARNLOOP_WEBHOOKS__H__OUTBOUND_URL": "https://a"},
            "starts with whsec_",
        ),
        (
            {"LEARNLOOP_WEBHOOKS__H__SECRET": "whsec_c2hvcnQ=", "LEARNLOOP_WEBHOOKS__H__OUTBOUND_URL": "https://a"},
            "24 to 64 bytes",
        ),
        ({"LEARNLOOP_WEBHOOKS__H__SECRET": WHSEC}, "webhooks.h.outbound_url is required"),
        ({"LEARNLOOP_TELEGRAM__SUPPORT": "x"}, "LEARNLOOP_TELEGRAM__<NAME>__<KEY>"),
        ({"LEARNLOOP_SLACK__TEAM__COLOR": "red"}, r"unknown setting\(s\) in \[slack.team\]"),
        (
            {"LEARNLOOP_OUTBOX_MIN_BACKOFF_S": "10", "LEARNLOOP_OUTBOX_MAX_BACKOFF_S": "1"},
            "min_backoff_s <= max_backoff_s",
        ),
    ],
)
def test_bad_im_tables_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env=env)


def test_auto_engine_serves_llamacpp_only_where_it_can() -> None:
    from server.engines import auto_engine, llama_cpp_available

    model = load_settings(env={}).model
    assert model.engine == "auto"
    engine, why = auto_engine(model)
    assert engine == ("llamacpp" if llama_cpp_available() else "transformers") and why
    tiny = load_settings(env={}, overrides={"model": {"name": "/some/tiny/folder"}}).model
    assert auto_engine(tiny) == (
        "transformers",
        "model.name '/some/tiny/folder' has no GGUF: set model.gguf to serve it with llama.cpp",
    )


def test_the_store_is_a_sqlite_file_unless_store_url_names_postgresql(tmp_path: Path) -> None:
    s = load_settings(env={}, data_dir=tmp_path)
    assert s.store.url is None and s.store_target == tmp_path / "learnloop.db"
    assert s.tombstone_path == tmp_path / "learnloop.db.erasures"
    url = "postgresql://learnloop:hunter2@db.internal:5432/learnloop"
    s = load_settings(env={"LEARNLOOP_STORE_URL": url}, data_dir=tmp_path)
    assert s.store_target == url and s.tombstone_path == tmp_path / "learnloop.db.erasures"
    assert "hunter2" not in repr(s.store) and "hunter2" not in str(s)  # a Secret: never printed
    with pytest.raises(SettingsError, match=r"store\.url"):
        load_settings(env={"LEARNLOOP_STORE_URL": "mysql://x@y/z"})
