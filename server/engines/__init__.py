"""Generation engines: the one place that picks one (``create_engine``) and what callers import.

``base`` holds what every engine shares (the ``Engine`` protocol, ``Chunk``, ``SamplingConfig``,
errors, the prompt rule ``fit_prompt``, and ``LocalEngine``, the worker thread of the in-process
engines); ``transformers``, ``llamacpp`` (with llama.cpp's tools in ``gguf``) and ``openai`` are
the engines. Code outside this package imports from ``server.engines`` only. The engines and
their helpers are loaded when first named (module ``__getattr__``), so importing this package
imports neither torch, llama_cpp nor httpx.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from server.engines.base import (
    Chunk,
    Engine,
    EngineError,
    EngineStats,
    Messages,
    OverloadedError,
    SamplingConfig,
    UnknownVersionError,
    fit_prompt,
    redirected,
)

log = logging.getLogger("learnloop.engine")

if TYPE_CHECKING:
    from server.engines.gguf import (
        ADAPTER_GGUF,
        QUANT_TYPES,
        converted_adapter_ok,
        extra_buffers_usable,
        fetch_sdist,
        gguf_linear_shapes,
        llama_cpp_available,
        probe_record,
        quantize_gguf,
        requantize,
        route_llama_log,
    )
    from server.engines.kvreuse import KvBook, Op, choose_slot, common_prefix, lane_for
    from server.engines.llamacpp import LlamaCppEngine
    from server.engines.openai import OpenAIEngine, trim_messages
    from server.engines.transformers import TransformersEngine
    from server.settings import ModelConfig

__all__ = [
    "ADAPTER_GGUF",
    "QUANT_TYPES",
    "Chunk",
    "Engine",
    "EngineError",
    "EngineStats",
    "KvBook",
    "LlamaCppEngine",
    "Messages",
    "Op",
    "OpenAIEngine",
    "OverloadedError",
    "SamplingConfig",
    "TransformersEngine",
    "UnknownVersionError",
    "auto_engine",
    "choose_slot",
    "common_prefix",
    "converted_adapter_ok",
    "create_engine",
    "extra_buffers_usable",
    "fetch_sdist",
    "fit_prompt",
    "gguf_linear_shapes",
    "lane_for",
    "llama_cpp_available",
    "probe_record",
    "quantize_gguf",
    "redirected",
    "requantize",
    "route_llama_log",
    "trim_messages",
]

_LAZY = {
    "TransformersEngine": "transformers",
    "LlamaCppEngine": "llamacpp",
    "OpenAIEngine": "openai",
    "trim_messages": "openai",
    "KvBook": "kvreuse",
    "Op": "kvreuse",
    "choose_slot": "kvreuse",
    "common_prefix": "kvreuse",
    "lane_for": "kvreuse",
    "ADAPTER_GGUF": "gguf",
    "QUANT_TYPES": "gguf",
    "converted_adapter_ok": "gguf",
    "extra_buffers_usable": "gguf",
    "fetch_sdist": "gguf",
    "gguf_linear_shapes": "gguf",
    "llama_cpp_available": "gguf",
    "probe_record": "gguf",
    "quantize_gguf": "gguf",
    "requantize": "gguf",
    "route_llama_log": "gguf",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def auto_engine(model: ModelConfig) -> tuple[str, str]:
    """The engine ``model.engine = "auto"`` serves with, and why: llamacpp when it can (faster at every
    concurrency measured, bench/RESULTS.md), else transformers (always installed)."""
    from server.engines.gguf import llama_cpp_available
    from training.models import DEFAULT_MODEL

    if model.gguf is None and model.name.lower() != DEFAULT_MODEL:
        return "transformers", f"model.name {model.name!r} has no GGUF: set model.gguf to serve it with llama.cpp"
    if not llama_cpp_available():
        return "transformers", "llama-cpp-python does not import: make install-llamacpp"
    return "llamacpp", "llama-cpp-python imports and the model has a GGUF"


def create_engine(model: ModelConfig, base_model_dir: str) -> Engine:
    """The engine ``model.engine`` names, configured from the ``[model]`` settings (not loaded yet).

    ``base_model_dir`` is the base model as a transformers folder: the transformers engine serves
    it; the llamacpp engine's LoRA converter reads its config.
    """
    engine = model.engine
    if engine == "auto":
        engine, why = auto_engine(model)
        log.info("model.engine auto: serving with %s (%s)", engine, why)
    if engine == "openai":
        from server.engines.openai import OpenAIEngine

        return OpenAIEngine(
            model.openai_replicas or model.openai_url,
            model.openai_model or model.name,
            api_key=model.openai_api_key,
            max_prompt_tokens=model.max_prompt_tokens,
            max_pending=model.max_pending,
            system_prompt=model.system_prompt,
            tokenizer=base_model_dir,  # the served model's special tokens, from its local files
        )
    if engine == "llamacpp":
        from server.engines.llamacpp import LlamaCppEngine
        from training.models import default_cache_dir, default_gguf

        return LlamaCppEngine(
            model.gguf or str(default_gguf()),
            quant=model.gguf_quant or None,
            base_model_dir=base_model_dir,
            cache_dir=default_cache_dir(),
            # settings to come (model.llama_cpp_src, model.llama_cpp_sdist, model.llama_extra_bufts)
            converter_src=model.llama_cpp_src,
            sdist=model.llama_cpp_sdist,
            extra_buffers=model.llama_extra_bufts,
            kv_reuse=model.kv_reuse,
            kv_resident=model.kv_resident,
            single_streams=model.single_streams,
            single_quant=model.gguf_quant_single or None,
            max_prompt_tokens=model.max_prompt_tokens,
            max_new_tokens=model.max_new_tokens,
            max_pending=model.max_pending,
            max_active=model.max_active,
            system_prompt=model.system_prompt,
        )
    from server.engines.transformers import TransformersEngine

    return TransformersEngine(
        base_model_dir,
        dtype=model.dtype,
        max_prompt_tokens=model.max_prompt_tokens,
        max_pending=model.max_pending,
        max_active=model.max_active,
        system_prompt=model.system_prompt,
    )
