"""bench/peer.py and bench/llama_server.py: the arithmetic, the arguments, the settings each side
gets, the JSON line, and the llama-server build's cache and source handling (no build: CI never
compiles llama-server). The slow test runs the whole bench at a tiny size where llama-server is
already built on the machine (``python bench/llama_server.py``; 206 compile steps, 43 minutes on 2 busy cores here)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import llama_server
from bench.peer import (
    SESSIONS,
    Measured,
    bandwidth_share,
    busy_share,
    cpu_seconds,
    decode_tps,
    gateway_env,
    json_line,
    measure_bandwidth,
    palindrome,
    parse_args,
    peer_args,
    report,
    summarize,
    wait_quiet,
)
from server.settings import load_settings

ROOT = Path(__file__).parent.parent


def test_palindrome_is_a_b_b_a() -> None:
    assert palindrome(["gateway", "peer"]) == ["gateway", "peer", "peer", "gateway"]
    assert palindrome(["g", "p1", "p2"]) == ["g", "p1", "p2", "p2", "p1", "g"]


def test_decode_rate_counts_the_tokens_after_the_first() -> None:
    assert decode_tps(128, 1.27) == pytest.approx(100.0)
    assert math.isnan(decode_tps(1, 0.0))  # one token: no decode interval
    assert math.isnan(decode_tps(5, 0.0))


def test_bandwidth_share() -> None:
    # 85 MB of weights a step at 100 steps/s over 34 GB/s: a quarter of the limit
    assert bandwidth_share(85_000_000, 100.0, 34e9) == pytest.approx(0.25)


def figures(single: float, agg8: float, p95: float, turns: list[float]) -> dict[str, object]:
    return {
        "single_tps": single,
        "single_ttft_s": 0.1,
        "agg8_tps": agg8,
        "ttft_p50_8_s": p95 / 2,
        "ttft_p95_8_s": p95,
        "turns_ttft_s": turns,
    }


def test_summary_holds_the_gateway_to_the_best_peer_per_figure() -> None:
    sides = {
        "gateway q8_0": figures(80.0, 210.0, 0.40, [1.0, 0.2, 0.3]),
        "peer shipped": figures(100.0, 180.0, 0.60, [2.0, 0.25, 0.2]),  # fastest alone, best turn 3
        "peer q8_0": figures(75.0, 200.0, 0.50, [1.1, 0.2, 0.3]),  # fastest at 8, lowest p95
    }
    weights = {"gateway q8_0": 145_000_000, "peer shipped": 85_000_000, "peer q8_0": 145_000_000}
    s = summarize(sides, gateway="gateway q8_0", weight_bytes=weights, bandwidth_bps=29e9)  # type: ignore[arg-type]
    assert s["peer_best"] == {
        "single": "peer shipped",
        "agg8": "peer q8_0",
        "ttft_p95_8": "peer q8_0",
        "turn6": "peer shipped",
    }
    assert s["peer_single_tps"] == 100.0 and s["ratio_single"] == pytest.approx(0.8)
    assert s["peer_agg8_tps"] == 200.0 and s["ratio_agg8"] == pytest.approx(1.05)
    assert s["peer_ttft_p95_8_s"] == 0.5 and s["ratio_ttft_p95_8"] == pytest.approx(0.8)
    assert s["gateway_turn6_ttft_s"] == 0.3 and s["peer_turn6_ttft_s"] == 0.2 and s["ratio_turn6"] == pytest.approx(1.5)
    assert s["done_when"] == {
        "single_ge_1x": False,
        "agg8_ge_1x": True,
        "ttft_p95_8_le_peer": True,
        "turn6_le_1.2x": False,
    }
    # one decode step per token alone; one step per 8 tokens at 8 sessions
    assert s["bandwidth_share"]["peer shipped"]["single"] == pytest.approx(85e6 * 100 / 29e9)
    assert s["bandwidth_share"]["gateway q8_0"]["agg8"] == pytest.approx(145e6 * 210 / SESSIONS / 29e9)
    assert s["bandwidth_gbs"] == pytest.approx(29.0)

    line = json_line(s)
    parsed = json.loads(line)
    for key in (
        "gateway_single_tps",
        "peer_single_tps",
        "gateway_agg8_tps",
        "peer_agg8_tps",
        "gateway_turn6_ttft_s",
        "peer_turn6_ttft_s",
        "ratio_single",
        "ratio_agg8",
    ):
        assert isinstance(parsed[key], float), key
    assert parsed["ratio_agg8"] == 1.05  # rounded to 4 digits
    text = "\n".join(report(s, {n: n for n in sides}))
    assert "single stream 0.80x (peer shipped)" in text and "turn-3 TTFT 1.50x (peer shipped)" in text


def test_summary_without_a_conversation_or_a_peer() -> None:
    sides = {"gateway q8_0": figures(80.0, 210.0, 0.4, []), "peer q8_0": figures(75.0, 200.0, 0.5, [])}
    s = summarize(sides, gateway="gateway q8_0", weight_bytes=dict.fromkeys(sides, 1), bandwidth_bps=1.0)  # type: ignore[arg-type]
    assert "gateway_turn6_ttft_s" not in s and "turn6_le_1.2x" not in s["done_when"]
    with pytest.raises(ValueError, match="at least one peer"):
        summarize({"gateway q8_0": sides["gateway q8_0"]}, gateway="gateway q8_0", weight_bytes={}, bandwidth_bps=1.0)  # type: ignore[arg-type]


def test_measured_figures_are_medians_and_the_p95_of_every_reply() -> None:
    m = Measured(
        single_tps=[90.0, 100.0, 80.0],
        single_ttft_s=[0.1, 0.2, 0.3],
        agg8_tps=[200.0, 190.0],
        agg8_ttft_s=[i / 100 for i in range(1, 17)],
        turns_ttft_s=[[1.0, 0.3], [1.2, 0.1]],
    )
    f = m.figures()
    assert f["single_tps"] == 90.0 and f["agg8_tps"] == 195.0
    assert f["ttft_p95_8_s"] == 0.15  # bench/serve.py's pct: rank round(0.95 x 15) = 14 of 0..15
    assert f["turns_ttft_s"] == [pytest.approx(1.1), pytest.approx(0.2)]


def test_arguments() -> None:
    a = parse_args([])
    assert a.gateway_quants == ["q8_0+shipped"] and a.peer_quants == ["shipped", "q8_0"]  # the engine's default
    assert (a.max_new_tokens, a.turns, a.threads) == (128, 6, os.cpu_count())
    a = parse_args(["--gateway-quants", "q4_0,shipped", "--peer-quants", "q4_0", "--turns", "0"])
    assert a.gateway_quants == ["q4_0", "shipped"] and a.peer_quants == ["q4_0"] and a.turns == 0
    a = parse_args(["--gateway-quants", "q8_0+shipped,q8_0"])
    assert a.gateway_quants == ["q8_0+shipped", "q8_0"]
    for bad in (
        ["--peer-quants", "q5_k"],
        ["--gateway-quants", ""],
        ["--peer-quants", "q8_0,q8_0"],
        ["--rounds", "0"],
        ["--peer-quants", "q8_0+shipped"],  # llama-server serves one format
        ["--gateway-quants", "q8_0+q8_0"],
        ["--gateway-quants", "q8_0+shipped+q4_0"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
    with pytest.raises(SystemExit):
        parse_args(["--turns", "99"])


def test_peer_arguments_name_the_settings() -> None:
    assert peer_args(2, 256) == ["-t", "2", "-np", "8", "-c", "16384", "--no-repack", "--cache-reuse", "256"]
    assert "--cache-reuse" not in peer_args(2, 0)


def test_gateway_settings_are_what_learnloop_serve_reads(tmp_path: Path) -> None:
    """The environment the bench gives ``learnloop serve`` is valid, and means what it says."""
    s = load_settings(env=gateway_env("q8_0", 128, None), data_dir=tmp_path)
    assert (s.model.engine, s.model.gguf_quant, s.model.max_new_tokens) == ("llamacpp", "q8_0", 128)
    assert s.model.temperature == 0.0 and s.model.system_prompt is None and s.model.single_streams == 0
    s = load_settings(env=gateway_env("q8_0+shipped", 128, None), data_dir=tmp_path)
    defaults = load_settings(env={}, data_dir=tmp_path).model
    assert (s.model.gguf_quant, s.model.gguf_quant_single, s.model.single_streams) == (
        defaults.gguf_quant,
        defaults.gguf_quant_single,
        defaults.single_streams,
    )  # the engine's default is what the bench holds to the peer
    s = load_settings(env=gateway_env("shipped", 64, "Be brief."), data_dir=tmp_path)
    assert s.model.gguf_quant == "" and s.model.system_prompt == "Be brief."


def test_bandwidth_is_measured() -> None:
    assert measure_bandwidth(mib=8, repeats=1) > 1e8  # 100 MB/s: any machine reads faster


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_only_vendor_llama_cpp_is_extracted(tmp_path: Path) -> None:
    sdist = _sdist(
        tmp_path / "llama_cpp_python-9.9.9.tar.gz",
        {
            "llama_cpp_python-9.9.9/setup.py": b"x",
            "llama_cpp_python-9.9.9/vendor/llama.cpp/CMakeLists.txt": b"project(x)",
            "llama_cpp_python-9.9.9/vendor/llama.cpp/tools/server/server.cpp": b"int main(){}",
        },
    )
    src = llama_server._extract_llama_cpp(sdist, tmp_path / "out")
    assert (src / "tools" / "server" / "server.cpp").is_file()
    assert not (tmp_path / "out" / "llama_cpp_python-9.9.9" / "setup.py").exists()
    with pytest.raises(RuntimeError, match=r"no vendor/llama\.cpp"):
        llama_server._extract_llama_cpp(_sdist(tmp_path / "empty.tar.gz", {"a/b": b""}), tmp_path / "o2")


def test_a_cached_binary_is_not_built_again(tmp_path: Path) -> None:
    cached = llama_server.binary_path("9.9.9", tmp_path)
    cached.parent.mkdir(parents=True)
    cached.write_text("#!/bin/sh\n")
    cached.chmod(0o755)
    # no sdist exists for 9.9.9 and none is fetched: the cached file is returned as it is
    assert llama_server.build(version="9.9.9", cache=tmp_path, src=str(tmp_path / "nowhere")) == cached


def test_a_source_without_the_server_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(RuntimeError, match="no tools/server"):
        llama_server.build(version="9.9.9", cache=tmp_path / "cache", src=str(tmp_path / "src"))


@pytest.mark.slow
def test_the_bench_runs_at_a_tiny_size() -> None:
    """The whole bench, once, tiny: where llama-server was built on this machine before."""
    if not llama_server.binary_path().is_file():
        pytest.skip("llama-server is not built here (python bench/llama_server.py builds it once)")
    cmd = [sys.executable, "bench/peer.py", "--peer-quants", "q8_0", "--max-new-tokens", "8"]
    cmd += ["--singles", "1", "--rounds", "1", "--turns", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["gateway"] == "gateway q8_0+shipped" and summary["peer_best"]["single"] == "peer q8_0"
    assert summary["gateway_single_tps"] > 0 and summary["peer_agg8_tps"] > 0
    assert len(summary["sides"]["peer q8_0"]["turns_ttft_s"]) == 2


def test_servers_are_idle_before_a_visit() -> None:
    """``wait_quiet`` reads real CPU time: a busy child keeps it waiting, an idle one does not."""
    assert busy_share({1: 10.0, 2: 5.0}, {1: 10.5, 2: 5.0}, 0.5) == 1.0  # one core's worth
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)
        assert cpu_seconds(busy.pid) > 0.05
        waited = asyncio.run(wait_quiet([idle.pid], window_s=0.2))
        assert waited < 1.0
        waited = asyncio.run(wait_quiet([idle.pid, busy.pid], window_s=0.2, timeout_s=1.0))
        assert waited >= 1.0  # gave up at the timeout: the busy one never went quiet
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
