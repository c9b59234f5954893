"""Shared fixtures: tiny models built from config and an offline tokenizer trained on fixture text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Tiny random models answer the canary prompts with near-ties that any edit flips, so the canary guard
# is off for the suite (services started by tests inherit this); tests of the guard turn it on.
os.environ.setdefault("MEND_CANARY_GUARD", "false")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def fixture_facts() -> list[dict]:
    """16 hand-written CounterFact-style records (EasyEdit format)."""
    return json.loads((FIXTURES / "facts.json").read_text())


def _corpus() -> list[str]:
    texts = []
    for r in fixture_facts():
        texts += [r["prompt"], r["rephrase_prompt"], r["locality_prompt"]]
        texts += [" " + r["target_new"], " " + r["ground_truth"], " " + r["locality_ground_truth"]]
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on the fixture facts (no hub, no files)."""
    return make_tiny_tokenizer()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer behind the ``tiny_tokenizer`` fixture, for scripts and non-fixture helpers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, init_range: float = 0.02) -> LlamaForCausalLM:
    """A 4-block llama; a larger ``init_range`` lets its 32-dim head express confident predictions."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(initializer_range=init_range,
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def make_tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_llama(tiny_tokenizer) -> LlamaForCausalLM:
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def tiny_model_dir(tiny_tokenizer, tiny_llama, tmp_path) -> Path:
    """The tiny llama and its tokenizer saved as a local model directory (what `--model DIR` takes)."""
    d = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tiny_gpt2(tiny_tokenizer) -> GPT2LMHeadModel:
    return make_tiny_gpt2(len(tiny_tokenizer))


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tiny_tokenizer):
    """Each test using this runs on both a Linear (llama) and a Conv1D (gpt2) architecture."""
    make = make_tiny_llama if request.param == "llama" else make_tiny_gpt2
    return make(len(tiny_tokenizer))


@pytest.fixture
def facts() -> list[dict]:
    return fixture_facts()
