"""`mend train` on a device: bf16 autocast of the passes the editor is not trained through (run here on
CPU, the only device this suite has), the card with device, steps and wall time, and a clear refusal of
--device cuda without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES

from editor_core.config import MendConfig
from editor_core.models import LoadedModel
from editor_core.train import TrainConfig, resolve_autocast, train
from editor_core.train_card import CARD_FILE
from service.cli import main

FACTS = str(FIXTURES / "facts.json")


def test_autocast_auto_is_off_on_cpu_and_checked():
    assert resolve_autocast(TrainConfig(device="cpu")) == "off"
    assert resolve_autocast(TrainConfig(device="cpu", autocast="bf16")) == "bf16"
    with pytest.raises(ValueError, match="autocast"):
        resolve_autocast(TrainConfig(autocast="fp8"))


def test_bf16_autocast_training_writes_checkpoint_and_card(tiny_gpt2, tiny_tokenizer, tmp_path):
    cfg = TrainConfig(data=[FACTS], out=str(tmp_path / "ed"), val_size=4, steps=4, val_every=2, edits_per_step=2,
                      autocast="bf16", mend=MendConfig(rank=8, last_blocks=1))
    history = train(cfg, LoadedModel(tiny_gpt2, tiny_tokenizer, "tiny", "memory"))
    assert len(history["train"]) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history["train"])
    out = tmp_path / "ed"
    info = json.loads((out / "editor_config.json").read_text())["training"]
    assert info["device"] == "cpu" and info["autocast"] == "bf16" and info["device_name"] and info["wall_s"] > 0
    card = (out / CARD_FILE).read_text()
    assert "| device | cpu (" in card and "| steps run | 4 of 4 (2 edits per step) |" in card
    assert "autocast bf16" in card and f"step {info['step']}" in card


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_cuda_is_refused(tmp_path, caplog):
    rc = main(["train", "--device", "cuda", "--data", FACTS, "--out", str(tmp_path / "ed"), "--steps", "1"])
    assert rc == 2 and "no CUDA device" in caplog.text and "--device cpu" in caplog.text
    assert not (tmp_path / "ed").exists()
