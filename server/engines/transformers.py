"""The ``transformers`` engine: a local transformers model with PEFT LoRA adapters as model versions.

A ``LocalEngine`` (``server/engines/base.py``): one worker thread owns the model and runs
rounds. In a round, new requests are prefilled (one forward each), then every request already
decoding advances by one token: requests on the same version decode together as one batch
(continuous batching: requests join and leave between rounds; the batch's KV cache is
left-padded and rebuilt only when its membership changes). So a long reply never holds back a
short one, ``stop`` takes effect within one step, and 8 sessions cost far less than 8 times
one. Each request names the version it generates with; the worker switches adapters only
between version groups. Adapter loads run on the worker between rounds (that is the swap
pause, measured in ``stats.swap_pauses_s``); replies that started on the old version finish on
it, because the old adapter stays loaded. Every chunk goes to the event loop as it is made.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from feedback.records import BASE_VERSION
from feedback.specials import tokenizer_specials
from server.engines.base import Chunk, LocalEngine, Request, UnknownVersionError

log = logging.getLogger("learnloop.engine")


@dataclass(eq=False)
class _Request(Request):
    past: Any = None
    generator: Any = None
    cache_len: int = 0  # tokens in this request's KV cache


@dataclass
class _Batch:
    """Decode-phase requests of one version stepping together, and their shared padded cache."""

    version: str
    requests: list[_Request]
    cache: Any
    mask: Any  # [batch, cached tokens]: 1 for real tokens, 0 for left padding


class TransformersEngine(LocalEngine[_Request]):
    """Serve a causal LM (any ``from_pretrained`` path or id) with versioned LoRA adapters."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_prompt_tokens: int = 1536,
        max_pending: int = 64,
        max_active: int = 16,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__(_Request, max_prompt_tokens, max_pending, max_active, system_prompt)
        self.model_path = model_path
        self.dtype = dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self.base_linear: dict[str, tuple[int, int]] = {}  # linear layer -> (out, in), for adapter checks
        self._active_adapter: str | None = None  # the PEFT adapter set active
        self._adapters_off = False  # True while serving the base model through a PeftModel
        self._eos: set[int] = set()
        self._batches: dict[str, _Batch] = {}  # the worker's: decode batches by version

    # --- life cycle -------------------------------------------------------------------------

    def _open(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        dtype = getattr(torch, self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model.eval()
        self.base_linear = {
            name: (m.out_features, m.in_features)
            for name, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self._is_eog = self._eos.__contains__
        self._text = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        self.special_texts = tokenizer_specials(self.tokenizer)
        log.info("loaded %s (%s) in %.1f s", self.model_path, self.dtype, time.monotonic() - started)

    def _worker_context(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        return torch.inference_mode()

    # --- adapters ---------------------------------------------------------------------------

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return self.base_linear

    def _attach(self, name: str, prepared: Any) -> str:
        from peft import PeftModel

        path = str(prepared)
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self._active_adapter = name
        self.model.eval()
        return path

    def _free_adapter(self, name: str, handle: Any) -> None:
        others = sorted({*self._adapters, *self._retired})
        if not others:  # PEFT keeps at least one adapter: go back to the plain model
            self.model = self.model.unload()
            self._active_adapter, self._adapters_off = None, False
            return
        if self._active_adapter == name:
            self.model.set_adapter(others[0])
            self._active_adapter = others[0]
        self.model.delete_adapter(name)

    def _use(self, version: str) -> None:
        target = None if version == BASE_VERSION else version
        if target is not None and self._adapter(target) is None:
            raise UnknownVersionError(f"version {version!r} is not loaded")
        current = None if self._adapters_off else self._active_adapter
        if (not self._adapters and not self._retired) or target == current:
            return
        if target is None:
            self.model.base_model.disable_adapter_layers()
            self._adapters_off = True
            return
        if self._adapters_off:
            self.model.base_model.enable_adapter_layers()
            self._adapters_off = False
        if target != self._active_adapter:
            self.model.set_adapter(target)
            self._active_adapter = target

    # --- prompts -------------------------------------------------------------------------

    def _render_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- generation ------------------------------------------------------------------------

    def _post(self, r: _Request, chunk: Chunk) -> None:
        # per token: a bare try costs nothing, contextlib.suppress an object per call
        try:  # noqa: SIM105
            r.loop.call_soon_threadsafe(r.chunks.put_nowait, chunk)
        except RuntimeError:  # a closed loop: nobody is listening any more
            pass

    def _round(self, active: list[_Request]) -> None:
        """One round: drop cancelled requests, prefill new ones, one decode step for the rest."""
        batches = self._batches
        finished: list[_Request] = []
        for r in active:
            if r.cancel.is_set():
                self._post(r, Chunk("", "cancelled", len(r.generated)))
                finished.append(r)
        arriving: dict[str, list[_Request]] = {}
        for r in active:
            if r.past is None and r not in finished:
                arriving.setdefault(r.version, []).append(r)
        for group in arriving.values():
            if len(group) == 1:
                if not self._guarded(group[0], self._prefill):
                    finished.append(group[0])
                continue
            try:
                finished += self._prefill_batch(group)
            except Exception as exc:
                finished += self._fail(group, exc, "batched prefill")
        decoding: dict[str, list[_Request]] = {}
        for r in active:
            if r not in finished and r.past is not None and r.generated:
                decoding.setdefault(r.version, []).append(r)
        for version in list(batches):
            if version not in decoding or batches[version].requests != decoding[version]:
                self._unbatch(batches.pop(version))
        for version, group in decoding.items():
            if len(group) == 1:
                if not self._guarded(group[0], self._decode_one):
                    finished.append(group[0])
                continue
            try:
                if version not in batches:
                    batches[version] = self._batch(version, group)
                finished += self._decode_batch(batches[version])
            except Exception as exc:
                batches.pop(version, None)
                finished += self._fail(group, exc, "batched generation")
        self._retire(active, finished)

    def _release(self, r: _Request) -> None:
        r.past = None

    def _guarded(self, r: _Request, step: Callable[[_Request], bool]) -> bool:
        """Run one step for ``r``; False once it is finished (done, or failed with an error chunk)."""
        try:
            return not step(r)
        except Exception as exc:
            self._fail([r], exc, "generation")
            return False

    def _prefill(self, r: _Request) -> bool:
        import torch

        self._use(r.version)
        self.stats.requests += 1
        if r.sampling.seed is not None:
            r.generator = torch.Generator().manual_seed(r.sampling.seed)
        # logits_to_keep=1: the prefill computes the vocabulary projection for the last position only
        out = self.model(input_ids=torch.tensor([r.prompt_ids]), cache=None, use_cache=True, logits_to_keep=1)
        r.past, r.cache_len = out.cache, len(r.prompt_ids)
        return self._accept(r, self._sample(out.logits[0, -1].float(), r))

    def _prefill_batch(self, group: list[_Request]) -> list[_Request]:
        """Prefill requests of one version in one forward (prompts left-padded); returns those finished."""
        import torch

        self._use(group[0].version)
        longest = max(len(r.prompt_ids) for r in group)
        ids = torch.zeros((len(group), longest), dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids) :] = 1
            self.stats.requests += 1
            if r.sampling.seed is not None:
                r.generator = torch.Generator().manual_seed(r.sampling.seed)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=None,
            use_cache=True,
            logits_to_keep=1,
        )
        for r in group:
            r.past, r.cache_len = out.cache, len(r.prompt_ids)
        self._unbatch(_Batch(group[0].version, list(group), out.cache, mask))
        return [r for i, r in enumerate(group) if self._accept(r, self._sample(out.logits[i, -1].float(), r))]

    def _decode_one(self, r: _Request) -> bool:
        import torch

        self._use(r.version)
        out = self.model(input_ids=torch.tensor([[r.generated[-1]]]), cache=r.past, use_cache=True)
        self.stats.decode_steps += 1
        r.past = out.cache
        r.cache_len += 1
        return self._accept(r, self._sample(out.logits[0, -1].float(), r))

    def _batch(self, version: str, group: list[_Request]) -> _Batch:
        """Stack the requests' caches into one, left-padded to the longest."""
        import torch
        from transformers import DynamicCache

        longest = max(r.cache_len for r in group)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for i, r in enumerate(group):
            mask[i, longest - r.cache_len :] = 1
        cache = DynamicCache()
        for layer_idx in range(len(group[0].past.layers)):
            keys, values = [], []
            for r in group:
                layer = r.past.layers[layer_idx]
                pad = longest - r.cache_len
                keys.append(torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(layer.values, (0, 0, pad, 0)))
            cache.update(torch.cat(keys), torch.cat(values), layer_idx)
        for r in group:
            r.past = cache  # shared while batched; _unbatch gives each its own again
        return _Batch(version, list(group), cache, mask)

    def _unbatch(self, batch: _Batch) -> None:
        """Give every request still running its own cache back (its real, right-aligned part)."""
        from transformers import DynamicCache

        for i, r in enumerate(batch.requests):
            if r.past is not batch.cache:
                continue  # finished (its cache was dropped)
            own = DynamicCache()
            for layer_idx, layer in enumerate(batch.cache.layers):
                own.update(
                    layer.keys[i : i + 1, :, -r.cache_len :].clone(),
                    layer.values[i : i + 1, :, -r.cache_len :].clone(),
                    layer_idx,
                )
            r.past = own

    def _decode_batch(self, batch: _Batch) -> list[_Request]:
        """One decode step for every request of the batch; returns those that finished."""
        import torch

        self._use(batch.version)
        rows = batch.requests
        batch.mask = torch.cat([batch.mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=torch.tensor([[r.generated[-1]] for r in rows]),
            attention_mask=batch.mask,
            position_ids=torch.tensor([[r.cache_len] for r in rows]),
            cache=batch.cache,
            use_cache=True,
        )
        self.stats.decode_steps += 1
        batch.cache = out.cache
        finished = []
        for i, r in enumerate(rows):
            r.past = batch.cache
            r.cache_len += 1
            if self._accept(r, self._sample(out.logits[i, -1].float(), r)):
                finished.append(r)
        return finished

    def _sample(self, logits: Any, r: _Request) -> int:
        import torch

        s = r.sampling
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < s.top_p
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=r.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=r.generator))
