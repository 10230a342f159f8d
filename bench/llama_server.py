"""llama.cpp's own ``llama-server``, built from the llama-cpp-python sdist's vendored llama.cpp, and run.

    python bench/llama_server.py [--sdist PATH | --src DIR] [--version 0.3.36]   # build only

The peer of ``bench/peer.py``. ``build()`` compiles the ``llama-server`` target of
``vendor/llama.cpp`` (the same llama.cpp revision the ``llamacpp`` engine runs through
llama-cpp-python) with cmake, Release, once: the binary is cached at
``<cache>/llama-server/<version>/llama-server`` (``<cache>`` is ``training.models.default_cache_dir()``,
``~/.cache/learnloop`` by default) and later calls return it at once. The sources come from, in
this order: ``src`` (a llama.cpp checkout), ``sdist`` (a llama-cpp-python .tar.gz), the sdist the
llamacpp engine already keeps for its LoRA converter (``<cache>/llama.cpp/downloads``, see
``server/engines/gguf.py``), else one fetched there with pip. Nothing is downloaded during the
build itself: the web UI, OpenSSL and curl are off. 206 build steps (7 minutes on a quiet 2-core machine here, 43 on busy shared cores); cmake's
``[ n/N]`` progress lines are shown, the whole log is kept in ``build.log`` beside the binary.

``LlamaServer`` starts it on a GGUF on an ephemeral loopback port and waits for ``/health``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VERSION = "0.3.36"
"""The llama-cpp-python version pinned by ``pyproject.toml``'s ``llamacpp`` extra."""

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no npm, and no prebuilt UI fetched from Hugging Face during the build
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary in the cache
)


def cache_root() -> Path:
    from training.models import default_cache_dir

    return default_cache_dir()


def binary_path(version: str = VERSION, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "llama-server" / version / "llama-server"


def find_sdist(version: str = VERSION, cache: Path | None = None) -> Path:
    """The llama-cpp-python ``version`` sdist: the one the llamacpp engine keeps, else fetched there with pip."""
    downloads = (cache or cache_root()) / "llama.cpp" / "downloads"
    found = sorted(downloads.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    from server.engines import fetch_sdist

    return fetch_sdist(version, downloads)


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """``<sdist>/vendor/llama.cpp`` extracted into ``dest``; returns the llama.cpp folder."""
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) >= 3 and parts[1:3] == ["vendor", "llama.cpp"]:
                members.append(member)
        if not members:
            raise RuntimeError(f"{sdist} holds no vendor/llama.cpp")
        tar.extractall(dest, members=members, filter="data")
    return dest / members[0].name.split("/")[0] / "vendor" / "llama.cpp"


PROGRESS = re.compile(r"^\[\s*\d+/\d+\]")


def build(
    *,
    version: str = VERSION,
    sdist: str | None = None,
    src: str | None = None,
    cache: Path | None = None,
    jobs: int | None = None,
    progress: bool = True,
) -> Path:
    """The cached ``llama-server`` binary for ``version``, built first when it is not there yet."""
    out = binary_path(version, cache)
    if out.is_file() and os.access(out, os.X_OK):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / "build.log"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        if src:
            source = Path(src)
        else:
            tarball = Path(sdist) if sdist else find_sdist(version, cache)
            print(f"llama-server: extracting vendor/llama.cpp from {tarball}", flush=True)
            source = _extract_llama_cpp(tarball, Path(tmp) / "src")
        if not (source / "tools" / "server").is_dir():
            raise RuntimeError(f"{source} holds no tools/server: not a llama.cpp source with llama-server")
        build_dir = Path(tmp) / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = ["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_FLAGS]
        compile_ = [
            "cmake",
            "--build",
            str(build_dir),
            "--target",
            "llama-server",
            "-j",
            str(jobs or os.cpu_count() or 1),
        ]
        print(
            f"llama-server {version}: building once (206 steps, minutes to tens of minutes on 2 cores; cached at {out}, log {log_path})",
            flush=True,
        )
        with open(log_path, "w") as log:
            for cmd in (configure, compile_):
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if progress and PROGRESS.match(line):
                        print("  " + line.rstrip()[:120], flush=True)
                if proc.wait() != 0:
                    raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); see {log_path}")
        built = build_dir / "bin" / "llama-server"
        if not built.is_file():
            raise RuntimeError(f"the build reported success but left no {built}; see {log_path}")
        staging = out.with_name(f".llama-server.{os.getpid()}")
        shutil.copy2(built, staging)
        staging.rename(out)  # atomic: a half-copied binary is never taken for a cached one
    print(f"llama-server: built in {time.monotonic() - started:.0f} s: {out}", flush=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``llama-server`` on ``gguf``, on loopback, started by ``start()`` and stopped by ``stop()``.

    ``args`` are appended to ``-m gguf --host 127.0.0.1 --port P``; the log goes to ``log_path``.
    llama-server takes no port 0, so a free port is picked just before it starts (a race with
    another process taking it in between shows as a failed start, reported with the log)."""

    def __init__(self, binary: Path, gguf: str, args: list[str], log_path: Path) -> None:
        self.binary, self.gguf, self.args, self.log_path = binary, gguf, args, log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(self.binary), "-m", self.gguf, "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self, timeout_s: float = 120.0) -> None:
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy in {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def main() -> None:
    ap = argparse.ArgumentParser(description="build llama-server once from the llama-cpp-python sdist")
    ap.add_argument("--version", default=VERSION, help="llama-cpp-python version whose vendored llama.cpp to build")
    ap.add_argument("--sdist", default=None, help="the llama-cpp-python .tar.gz (default: the engine's, else pip)")
    ap.add_argument("--src", default=None, help="a llama.cpp checkout to build instead of the sdist's")
    args = ap.parse_args()
    print(build(version=args.version, sdist=args.sdist, src=args.src))


if __name__ == "__main__":
    main()
