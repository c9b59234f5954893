"""Tiny random models of every architecture family in ``editor_core.targets.FAMILIES``, built from
config and saved as model directories (what a user brings), for the bring-your-own-model tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from editor_core.methods.locate import LocateConfig
from editor_core.methods.values import ValueConfig

LAYERS = [1, 2]  # of 4 blocks
_IDS = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}  # inside the 400-token tiny vocabulary
_GENERIC = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128, **_IDS}

# model_type -> config kwargs of a 4-block model (vocab_size added by the test). One per FAMILIES row.
TINY_CONFIGS: dict[str, dict] = {
    "gpt2": {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128, **_IDS},
    "llama": _GENERIC, "mistral": _GENERIC, "qwen2": _GENERIC, "qwen3": _GENERIC, "smollm3": _GENERIC,
    "olmo2": _GENERIC, "phi3": _GENERIC, "phi": _GENERIC, "starcoder2": _GENERIC,
    "gemma": {**_GENERIC, "head_dim": 8}, "gemma2": {**_GENERIC, "head_dim": 8},
    "gemma3_text": {**_GENERIC, "head_dim": 8},
    "gptj": {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128, "rotary_dim": 4, **_IDS},
    "gpt_neo": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "max_position_embeddings": 128,
                "attention_types": [[["global", "local"], 2]], "window_size": 16, **_IDS},
    "falcon": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, **_IDS},
}


def tiny_locate_config(d_in: int) -> LocateConfig:
    """Value settings a random 4-block model can reach (a real model uses the defaults)."""
    value = ValueConfig(steps=30, lr=0.5, clamp_norm=4.0, kl_weight=0.0625, weight_decay=0.01,
                        prefixes=("", "Note: "))
    return LocateConfig(rome_layers=[2], memit_layers=LAYERS, alphaedit_layers=LAYERS, memit_lambda=1.0,
                        null_dims=d_in * 3 // 4, value=value)


def save_tiny_model(family: str, tokenizer, directory):
    """A random 4-block model of ``family`` and the tiny tokenizer, saved as a model directory; returns it."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **TINY_CONFIGS[family])
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model
