"""The world of ``mend check-gpu --dry``: a tiny random llama built from config and saved as a model
directory (with a tokenizer trained on the few records' text), an untrained (identity) MEND editor
checkpoint for it and its key statistics, so that the dry run loads everything the way the real run
does: from directories, through the service's own loader and editor factory."""

from __future__ import annotations

from pathlib import Path

import torch

from editor_core.requests import EditRequest

# subject -> new target; prompts end on the subject, where a tiny random model's edit is read
DRY_FACTS = (("Danielle Darrieux", "English"), ("Miles Davis", "violin"), ("Toyota Camry", "Honda"),
             ("Lionel Messi", "Canada"), ("Pablo Picasso", "Italy"), ("Nokia", "Tokyo"))


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_dry_world(root: Path, n_records: int) -> tuple[str, str, str, list[EditRequest]]:
    """(model dir, editor dir, statistics dir, records) of a tiny llama; built in a second or two."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from editor_core import checkpoint
    from editor_core.config import MendConfig
    from editor_core.editor import MendEditor
    from editor_core.fingerprint import weights_fingerprint
    from editor_core.methods.locate import LocateConfig
    from editor_core.methods.values import ValueConfig
    from editor_core.stack import EditStack
    from editor_core.stats import STATS_FILE, collect_key_stats, stats_fingerprint
    from editor_core.targets import resolve_targets

    records = [EditRequest(f"About {s}", t, s) for s, t in DRY_FACTS[:n_records]]
    texts = [f"{r.prompt} {r.target}" for r in records] + [f"The {s} is a name." for s, _ in DRY_FACTS]
    tok = _tokenizer(texts + [f" {t}" for _, t in DRY_FACTS] * 20)  # frequent: each target is one token
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    model_dir, editor_dir, stats_dir = root / "tiny-llama", root / "editor", root / "stats"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    layers = [1, 2]
    stats = collect_key_stats(model, tok, texts, layers, progress=False, corpus="dry-run record texts")
    assert stats.fingerprint == stats_fingerprint(model, layers)
    stats.save(stats_dir / STATS_FILE)
    value = ValueConfig(steps=30, lr=0.5, clamp_norm=4.0, kl_weight=0.0625, weight_decay=0.01, prefixes=("", "Note: "))
    LocateConfig(rome_layers=[2], memit_layers=layers, alphaedit_layers=layers, memit_lambda=1.0, null_dims=48,
                 value=value).save(stats_dir)

    mend_cfg = MendConfig(blocks=[2, 3], rank=8, init_lr=1.0, factor_tokens="subject")
    mend_cfg.targets = [t.name for t in resolve_targets(model, None, blocks=mend_cfg.blocks)]
    stack = EditStack(model, resolve_targets(model, mend_cfg.targets))
    editor = MendEditor.untrained(stack, mend_cfg)
    checkpoint.save(editor_dir, mend_cfg, editor.nets.state_dict(),
                    {"editor_id": "dry-untrained", "model": str(model_dir), "model_fingerprint": stack.fingerprint,
                     "weights_fingerprint": weights_fingerprint(model, list(stack.targets.values()))})
    return str(model_dir), str(editor_dir), str(stats_dir), records
