"""Test factories: a tiny random Llama with a real byte-level BPE tokenizer and a chat template.

Built from a config in about a second, so fast tests exercise the real transformers, PEFT
and TRL code paths without downloading anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feedback import FeedbackStore

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Hello! How can I help you today?",
    "Refunds are accepted within 30 days of delivery.",
    "Shipping takes 3 to 5 business days and costs 4.99.",
    "Our support team is available Monday to Friday, 9am to 5pm.",
    "To reset your password, click 'Forgot password' on the login page.",
    "You can track your order from the Orders page of your account.",
    "The warranty covers manufacturing defects for two years.",
    "What is your refund policy? How long does shipping take? Where is my order?",
    "Thank you for your patience. Is there anything else I can help with?",
    "user assistant system",
]


def build_tiny_model(path: Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM and its tokenizer to ``path``; return ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


async def register_candidate(
    store: FeedbackStore, adapter: Path, base_model: str, *, eval_report: dict[str, Any] | None = None
) -> str:
    """Register an adapter folder (with its real sha256) as a candidate version; returns its name."""
    from training.validate import ADAPTER_FILE, sha256_file

    version = await store.versions.register(
        adapter_path=str(adapter),
        sha256=sha256_file(adapter / ADAPTER_FILE),
        parent="base",
        base_model=base_model,
        eval_report=eval_report or {},
        feedback_ids={},
        training_run_id=None,
    )
    return version.name


async def ask_reply(client: Any, text: str, cid: str) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """Send one message on a test client; (done frame, reply text, frames up to done). An error frame fails."""
    await client.send(type="message", text=text, client_id=cid)
    await client.until("ack")
    done, frames = await client.until("done")
    return done, "".join(f["delta"] for f in frames if f["type"] == "token"), frames
