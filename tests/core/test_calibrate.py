import json
import math

import pytest
import torch
from conftest import FIXTURES, make_tiny_llama
from safetensors.torch import load_file

from editor_core.calibrate import calibrate_step_size, fold_scale
from editor_core.calibrate import run as calibrate_run
from editor_core.config import MendConfig
from editor_core.data import load_records
from editor_core.models import LoadedModel
from editor_core.train import EditorTrainer, TrainConfig, train, train_val_split

FACTS = str(FIXTURES / "facts.json")


def tiny_trainer(tokenizer, **cfg) -> EditorTrainer:
    model = make_tiny_llama(len(tokenizer), init_range=0.3)
    config = TrainConfig(data=[FACTS], mend=MendConfig(rank=8, last_blocks=2), **cfg)
    return EditorTrainer(config, LoadedModel(model, tokenizer, "tiny", "memory"))


def test_sweep_scores_every_factor_picks_the_best_and_leaves_the_editor_as_it_was(tiny_tokenizer):
    trainer = tiny_trainer(tiny_tokenizer)
    before = trainer.editor.nets.log_lr.detach().clone()
    records = load_records(FACTS)[:6]
    result = calibrate_step_size(trainer, records, [1.0, 0.25, 4.0, 0.25])
    assert [row["scale"] for row in result.sweep] == [0.25, 1.0, 4.0]  # sorted, duplicates dropped
    best = max(row["score"] for row in result.sweep)
    assert result.scale == max(row["scale"] for row in result.sweep if row["score"] == best)
    assert torch.equal(trainer.editor.nets.log_lr, before)
    # a factor of 1 scores exactly what plain validation scores
    assert result.sweep[1] == {"scale": 1.0, **trainer.validate(records)}


def test_locality_budget_picks_the_largest_factor_that_keeps_the_neighbourhood(tiny_tokenizer):
    trainer = tiny_trainer(tiny_tokenizer)
    records = load_records(FACTS)[:6]
    # a floor nothing can reach: the gentlest factor; a floor everything clears: the strongest
    assert calibrate_step_size(trainer, records, [0.5, 1.0, 2.0], unedited_neighborhood=2.0).scale == 0.5
    assert calibrate_step_size(trainer, records, [0.5, 1.0, 2.0], unedited_neighborhood=-1.0).scale == 2.0
    sweep = calibrate_step_size(trainer, records, [0.5, 1.0, 2.0]).sweep
    floor = sorted(row["neighborhood"] for row in sweep)[1]  # exactly one or two factors clear it
    chosen = calibrate_step_size(trainer, records, [0.5, 1.0, 2.0], unedited_neighborhood=floor,
                                 locality_budget=0.0).scale
    assert chosen == max(row["scale"] for row in sweep if row["neighborhood"] >= floor)


def test_folding_a_factor_scales_the_edit_and_nothing_else(tiny_tokenizer):
    trainer = tiny_trainer(tiny_tokenizer)
    request = load_records(FACTS)[0].to_request()
    before = trainer.editor.compute_delta(trainer.model, trainer.tok, [request])
    fold_scale(trainer, 0.5)
    after = trainer.editor.compute_delta(trainer.model, trainer.tok, [request])
    for name, up in before.updates.items():
        assert torch.allclose(after.updates[name].u, 0.5 * up.u, rtol=1e-5, atol=1e-9)
        assert torch.equal(after.updates[name].v, up.v)


def test_non_positive_factors_are_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="positive"):
        calibrate_step_size(tiny_trainer(tiny_tokenizer), load_records(FACTS)[:2], [0.5, 0.0])


def test_cli_calibrates_a_trained_checkpoint_in_place_on_its_own_validation_split(tiny_tokenizer, tmp_path):
    model = make_tiny_llama(len(tiny_tokenizer), init_range=0.3)
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "ed"
    cfg = TrainConfig(model=str(model_dir), data=[FACTS], out=str(out), val_size=4, steps=2, val_every=2,
                      edits_per_step=2, mend=MendConfig(rank=8, last_blocks=1))
    train(cfg, LoadedModel(model, tiny_tokenizer, "tiny", "memory"))
    def log_lr() -> torch.Tensor:
        return load_file(str(out / "editor.safetensors"))["log_lr"]

    before = log_lr()
    args = type("Args", (), {"editor": str(out), "out": None, "scales": [0.5, 2.0], "device": "cpu",
                             "locality_budget": 0.05})()
    assert calibrate_run(args) == 0
    doc = json.loads((out / "editor_config.json").read_text())
    cal = doc["calibration"]
    assert cal["val_records"] == len(train_val_split(cfg)[1]) == 4
    assert [row["scale"] for row in cal["sweep"]] == [0.5, 2.0] and cal["scale"] in (0.5, 2.0)
    assert cal["total_scale"] == cal["scale"] and cal["criterion"].startswith("largest factor")
    assert torch.allclose(log_lr(), before + math.log(cal["scale"]))
    assert doc["training"]["config"]["val_size"] == 4  # the training record is kept


def test_cli_refuses_a_checkpoint_without_training_config(tiny_tokenizer, tmp_path, caplog):
    from editor_core import checkpoint

    trainer = tiny_trainer(tiny_tokenizer)
    checkpoint.save(tmp_path / "ed", trainer.cfg.mend, trainer.state(), {"model": "tiny"})
    args = type("Args", (), {"editor": str(tmp_path / "ed"), "out": None, "scales": [0.5], "device": "cpu",
                             "locality_budget": 0.05})()
    assert calibrate_run(args) == 2
    assert "no training config" in caplog.text
