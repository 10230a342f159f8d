"""llama.cpp's tools around the ``llamacpp`` engine: the LoRA converter, adapter conversion,
requantizing the served GGUF, layer shapes from a GGUF, the CPU probe for llama.cpp's extra
buffer types, and llama.cpp's log routed to Python logging.

Everything here is blocking (subprocesses, file I/O): callers run it in a thread. Nothing here
reads the environment: where the converter comes from is the engine's constructor's to say.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from feedback.specials import special_strings
from server.engines.base import EngineError

log = logging.getLogger("learnloop.engine.llamacpp")

ADAPTER_GGUF = "adapter.gguf"
"""Name of the converted adapter, written next to ``adapter_model.safetensors``."""


def llama_cpp_available() -> bool:
    """True when llama-cpp-python imports (its shared library loads)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- the LoRA converter (llama.cpp's convert_lora_to_gguf.py, from the llama-cpp-python sdist) ---


def _llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def converter_dir(cache_dir: Path | None, *, src: str | None = None, sdist: str | None = None) -> Path:
    """A folder holding ``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py/`` (extracted once).

    ``src`` (a llama.cpp checkout) wins; else the cache folder
    ``<cache_dir>/llama.cpp/<llama-cpp-python version>``, extracted from the llama-cpp-python
    sdist of the installed version: ``sdist`` if given, else one already downloaded to
    ``<cache_dir>/llama.cpp/downloads``, else one fetched there now (``fetch_sdist``). The
    converter must match the installed llama.cpp (the GGUF LoRA format follows it).
    """
    if src:
        folder = Path(src)
        if not (folder / "convert_lora_to_gguf.py").is_file():
            raise EngineError(f"the llama.cpp source {src} holds no convert_lora_to_gguf.py")
        return folder
    if cache_dir is None:
        raise EngineError("llama.cpp's LoRA converter needs a cache folder or a llama.cpp source folder")
    ver = _llama_cpp_version()
    dest = cache_dir / "llama.cpp" / ver
    if (dest / "convert_lora_to_gguf.py").is_file() and (dest / "gguf-py").is_dir():
        return dest
    if not sdist:
        downloads = dest.parent / "downloads"
        found = sorted(downloads.glob(f"llama_cpp_python-{ver}.tar.gz"))
        sdist = str(found[0] if found else fetch_sdist(ver, downloads))
    _extract_converter(Path(sdist), dest)
    return dest


def fetch_sdist(version: str, downloads: Path) -> Path:
    """The fallback when no sdist and no llama.cpp source were given: ``pip download`` the
    llama-cpp-python ``version`` sdist into ``downloads`` (once; later calls find it there)."""
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["-d", str(downloads), f"llama-cpp-python=={version}"]
    log.warning(
        "no llama-cpp-python sdist or llama.cpp source given for the LoRA converter: fetching the %s sdist "
        "with pip into %s (give the engine an sdist or a llama.cpp source to avoid it)",
        version,
        downloads,
    )
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        raise EngineError(f"`{' '.join(cmd)}` failed; give the engine the llama-cpp-python sdist")
    found = sorted(downloads.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise EngineError(f"pip reported success but no llama-cpp-python sdist is in {downloads}")
    return found[0]


def _extract_converter(sdist: Path, dest: Path) -> None:
    staging = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # <sdist>/vendor/llama.cpp/{convert_lora_to_gguf.py, conversion/..., gguf-py/...}
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            rest = parts[3:]
            if rest[0] not in ("convert_lora_to_gguf.py", "conversion", "gguf-py") or not member.isfile():
                continue
            member.name = "/".join(rest)
            tar.extract(member, staging, filter="data")
    if not (staging / "convert_lora_to_gguf.py").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise EngineError(f"{sdist} holds no vendor/llama.cpp/convert_lora_to_gguf.py")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def _conversion_record(folder: Path) -> Path:
    return folder / f"{ADAPTER_GGUF}.json"


def converted_adapter_ok(folder: Path) -> bool:
    """True when ``adapter.gguf`` is the conversion of the folder's current weights, byte for byte.

    The conversion writes ``adapter.gguf.json`` with the SHA-256 of the safetensors it read and of
    the GGUF it wrote; a GGUF that was replaced, or that belongs to other weights, is not reused.
    """
    out, weights = folder / ADAPTER_GGUF, folder / "adapter_model.safetensors"
    try:
        record = json.loads(_conversion_record(folder).read_text())
        return bool(
            out.is_file()
            and weights.is_file()
            and record.get("source_sha256") == _sha256(weights)
            and record.get("sha256") == _sha256(out)
        )
    except (OSError, ValueError, AttributeError):
        return False


_RUN_CONVERTER = (
    "import runpy, sys; sys.path[:0] = sys.argv[1:3]; sys.argv = sys.argv[3:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def convert_adapter(
    adapter_dir: str | Path, base_model_dir: str | Path, *, converter: Path, outtype: str = "f16"
) -> Path:
    """Convert a PEFT LoRA folder to ``adapter.gguf`` next to it (once; reused while its checksums hold).

    Blocking (a subprocess that imports torch: seconds). ``base_model_dir`` is the base model as a
    transformers folder (only its config is read); ``converter`` is ``converter_dir``'s folder.
    """
    folder = Path(adapter_dir)
    out = folder / ADAPTER_GGUF
    if converted_adapter_ok(folder):
        return out
    tmp = folder / f".{ADAPTER_GGUF}.{os.getpid()}.{threading.get_ident()}.tmp"
    # the converter and its gguf-py go first on the child's path (the gguf package installed here may be
    # older than the converter); the child inherits our environment untouched
    cmd = [sys.executable, "-c", _RUN_CONVERTER, str(converter / "gguf-py"), str(converter)]
    cmd += [str(converter / "convert_lora_to_gguf.py"), "--outtype", outtype, "--outfile", str(tmp)]
    cmd += ["--base", str(base_model_dir), str(folder)]
    started = time.monotonic()
    source_sha = _sha256(folder / "adapter_model.safetensors")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise EngineError(f"converting {folder} to GGUF failed ({proc.returncode}): " + " | ".join(tail))
    record = {"source_sha256": source_sha, "sha256": _sha256(tmp), "outtype": outtype}
    tmp.replace(out)  # atomic: a reader never sees half a file
    tmp_record = folder / f".{ADAPTER_GGUF}.json.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp_record.write_text(json.dumps(record))
    tmp_record.replace(_conversion_record(folder))
    log.info("converted %s to %s in %.1f s", folder, out.name, time.monotonic() - started)
    return out


def rslora_scale(folder: Path) -> float:
    """llama.cpp scales a LoRA by alpha/r; rank-stabilised LoRA (PEFT use_rslora) wants alpha/sqrt(r)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return 1.0
    if config.get("use_rslora") and config.get("r"):
        return math.sqrt(float(config["r"]))
    return 1.0


# --- the served GGUF ----------------------------------------------------------------------------

QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
}
"""The formats ``model.gguf_quant`` may serve: the ones llama.cpp's batched CPU kernels
(llamafile's tinyBLAS on AVX) cover, so several sequences per step stay fast."""


def requantize(src: str | Path, quant: str) -> Path:
    """``src`` requantized to ``quant`` (a key of ``QUANT_TYPES``) next to it, once; reused after.

    llama.cpp's batched kernels (prefill, several sequences per step) cover Q8_0, Q4_0, Q5_0 and
    IQ4_NL but not the Q4_1 the default model ships in. Q8_0 from Q4_1 keeps the Q4_1 values almost exactly (the
    weights the adapters were trained against); Q4_0 from Q4_1 rounds them a second time.
    Blocking (about a second for SmolLM2-135M).
    """
    if quant not in QUANT_TYPES:
        raise EngineError(f"unknown GGUF quantization {quant!r}; use one of {', '.join(QUANT_TYPES)}")
    return quantize_gguf(src, quant, QUANT_TYPES[quant])


def quantize_gguf(src: str | Path, name: str, ftype: str) -> Path:
    """``src`` written as llama.cpp's file type ``ftype`` (a ``LLAMA_FTYPE_*`` name; requantizing
    allowed, so a quantized file may become floats too) to ``<stem>.<name>.gguf`` beside it, once:
    reused while it is newer than ``src``. Blocking."""
    import llama_cpp.llama_cpp as ll

    source = Path(src)
    out = source.with_name(f"{source.stem}.{name}.gguf")
    if out.is_file() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    route_llama_log(ll)
    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, ftype)
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    started = time.monotonic()
    rc = ll.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EngineError(f"llama.cpp could not requantize {source} to {name} ({rc})")
    tmp.replace(out)
    log.info("requantized %s to %s in %.1f s", source.name, out.name, time.monotonic() - started)
    return out


def gguf_linear_shapes(gguf_path: str) -> dict[str, tuple[int, int]]:
    """Linear layer (transformers module name) -> (out, in), read from a GGUF's tensor infos.

    Empty when the architecture is unknown to the installed ``gguf`` package (then shapes are
    not checked before loading; llama.cpp still refuses an adapter that does not fit). The
    ``gguf`` package parses every metadata field in Python (the vocabulary too: about 2 s of each
    start for SmolLM2 on these cores), so the shapes are kept beside the file, keyed by its size
    and time and by the ``gguf`` package's version (a newer one may map more architectures or map
    them differently), and read from there by later starts.
    """
    stat = Path(gguf_path).stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}:gguf {_gguf_version()}"
    kept = Path(f"{gguf_path}.linear-shapes.json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        found = json.loads(kept.read_text())
        if found["stamp"] == stamp:
            return {name: (int(o), int(i)) for name, (o, i) in found["linear"].items()}
    linear = _read_linear_shapes(gguf_path)
    if linear:
        with contextlib.suppress(OSError):  # a read-only model cache: read the file again next start
            tmp = kept.with_name(f"{kept.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"stamp": stamp, "linear": linear}))
            tmp.replace(kept)
    return linear


def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")  # the package has no __version__
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _read_linear_shapes(gguf_path: str) -> dict[str, tuple[int, int]]:
    try:
        import gguf

        reader = gguf.GGUFReader(gguf_path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        n_blocks = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        names = gguf.get_tensor_name_map(by_name[arch], n_blocks)
        shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    except Exception as exc:  # unknown architecture or an old gguf package: skip the shape check
        log.warning("cannot read layer shapes from %s (%s); adapter shapes are not checked", gguf_path, exc)
        return {}
    linear: dict[str, tuple[int, int]] = {}
    for hf_name, (_, gguf_name) in names.mapping.items():
        shape = shapes.get(f"{gguf_name}.weight")
        if shape is not None and len(shape) == 2:
            linear[hf_name] = (shape[1], shape[0])  # GGUF lists ne0 (in) first
    return linear


# --- llama.cpp in this process ------------------------------------------------------------------

_llama_log = logging.getLogger("learnloop.llama.cpp")
_log_callback: Any = None  # the ctypes callback: must outlive every call llama.cpp makes to it


def route_llama_log(ll: Any) -> None:
    """Send llama.cpp's log to Python logging (its info lines at DEBUG) instead of stderr."""
    global _log_callback
    if _log_callback is not None:
        return
    levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 cont
    last = [logging.DEBUG]

    def callback(level: int, text: bytes | None, _user: Any) -> None:
        if level != 5:
            last[0] = levels.get(level, logging.DEBUG)
        line = (text or b"").decode("utf-8", errors="replace").rstrip()
        if line:
            _llama_log.log(last[0], "%s", line)

    _log_callback = ll.llama_log_callback(callback)
    ll.llama_log_set(_log_callback, ctypes.c_void_p(0))


_extra_buffers: dict[str, bool] = {}

_PROBE = """
import sys, llama_cpp.llama_cpp as ll
quiet = ll.llama_log_callback(lambda *a: None)
ll.llama_log_set(quiet, ll.ctypes.c_void_p(0))
ll.llama_backend_init()
p = ll.llama_model_default_params()
p.use_extra_bufts = True
m = ll.llama_model_load_from_file(sys.argv[1].encode(), p)
c = ll.llama_context_default_params()
c.n_ctx, c.n_batch, c.n_threads, c.n_threads_batch = 256, 64, 1, 1
ctx = ll.llama_init_from_model(m, c)
b = ll.llama_batch_init(64, 0, 1)
for i in range(64):  # logits for every row: the output matmul then runs batched, as for 8 replies
    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = 1, i, 1, 1
    b.seq_id[i][0] = 0
b.n_tokens = 64
sys.exit(ll.llama_decode(ctx, b))
"""


def extra_buffers_usable(gguf_path: str, *, fresh: bool = False, probe: str = _PROBE) -> bool:
    """Whether llama.cpp may put weights in its extra buffer types (AMX tiles, repacked layouts).

    Some virtual machines advertise AMX (``amx_tile`` in /proc/cpuinfo) but fault on its
    instructions (SIGILL in the first prefill). Where AMX is advertised, a subprocess decodes
    once with the extra buffers to find out (once per file and process): 64 tokens with logits
    for every one, so the output matmul runs on many rows as it does for a step of several
    replies (a Q5_0 file, whose only Q8_0 tensor is the tied output, passed a probe asking the
    last token's logits alone and then crashed at the first step with two rows). A probe that crashed
    (killed by a signal: SIGILL, SIGSEGV, SIGBUS) is remembered on disk beside the GGUF
    (``probe_record``), keyed by the CPU, the kernel and the llama.cpp build; one that merely
    failed (exit 1: an import error, memory pressure) costs this process the extra buffers and
    is probed again next start: the crashing probe costs seconds of every restart (issue 15's kill -9
    restarts), and a "usable" verdict is never taken from disk, since a wrong one would crash
    the server at its first reply rather than cost it speed.

    ``fresh``: forget this process's verdict first (as a new process would start); ``probe``: the
    script the subprocess runs (the tests pass scripts that fail in each way).
    """
    if fresh:
        _extra_buffers.pop(gguf_path, None)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    if "amx_tile" not in cpuinfo:
        return True
    if gguf_path not in _extra_buffers:
        record = probe_record(gguf_path, cpuinfo)
        if record.exists():
            _extra_buffers[gguf_path] = False
            log.warning("llama.cpp's AMX/repacked weights failed on this CPU before (%s); serving without them", record)
            return False
        proc = subprocess.run([sys.executable, "-c", probe, gguf_path], capture_output=True, timeout=300)
        _extra_buffers[gguf_path] = proc.returncode == 0
        if proc.returncode != 0:
            log.warning(
                "llama.cpp's AMX/repacked weights fail on this CPU (probe exit %s); serving without them",
                proc.returncode,
            )
            if proc.returncode < 0:  # a crash by signal says what the CPU does; anything else may pass
                with contextlib.suppress(OSError):  # a read-only model cache: probe again next start
                    record.write_text(f"probe exit {proc.returncode} ({signal.Signals(-proc.returncode).name})\n")
    return _extra_buffers[gguf_path]


def probe_record(gguf_path: str, cpuinfo: str) -> Path:
    """Where a failed extra-buffer probe of this GGUF is remembered: beside it, named by a hash of
    what decides the probe's outcome (the CPU's model, flags and microcode, the kernel, the
    llama.cpp build, the file's size and time)."""
    import llama_cpp

    cpu = sorted({line for line in cpuinfo.splitlines() if line.split(":")[0].strip() in _CPU_KEYS})
    stat = Path(gguf_path).stat()
    key = "\n".join([*cpu, platform.release(), str(llama_cpp.__version__), f"{stat.st_size} {stat.st_mtime_ns}"])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(f"{gguf_path}.no-extra-buffers-{digest}")


_CPU_KEYS = {"model name", "flags", "microcode"}


_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template(source: str | None) -> Any:
    """The GGUF's chat template (jinja, sandboxed) or ChatML where it has none."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise EngineError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source or _CHATML)


def token_piece(ll: Any, vocab: Any, token: int, *, special: bool) -> str:
    """The text of one token of a llama.cpp vocabulary ("" for no token)."""
    if token < 0:
        return ""
    buf = ctypes.create_string_buffer(256)
    n = ll.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")


def vocab_specials(ll: Any, vocab: Any) -> tuple[str, ...]:
    """The text of every CONTROL and USER_DEFINED token: what llama.cpp's tokenizer matches as a
    special token when it reads text (``feedback.specials`` keeps message text from becoming one)."""
    control = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_USER_DEFINED
    return special_strings(
        token_piece(ll, vocab, t, special=True)
        for t in range(ll.llama_vocab_n_tokens(vocab))
        if ll.llama_vocab_get_attr(vocab, t) & control
    )
