import json
import random

import pytest
import torch
from conftest import FIXTURES, make_tiny_llama

from editor_core.batching import build_batch, mean_target_nll
from editor_core.config import MendConfig
from editor_core.data import load_records, split_records
from editor_core.editor import MendEditor
from editor_core.functional_edit import added_updates
from editor_core.models import LoadedModel
from editor_core.stats import KeyStats
from editor_core.train import EditorTrainer, TrainConfig, applied_updates, train

FACTS = str(FIXTURES / "facts.json")


def held_out_nll(trainer: EditorTrainer, records) -> float:
    """Mean post-edit NLL of target_new on each record's prompt and rephrase, one edit at a time."""
    trainer.editor.nets.eval()
    losses = []
    for r in records:
        delta = trainer.editor.compute_delta(trainer.model, trainer.tok, [r.to_request()])
        b = build_batch(trainer.tok, [r.prompt, *r.rephrases], [r.target_new] * (1 + len(r.rephrases)))
        with torch.no_grad(), added_updates(trainer.model, delta.updates):
            logits = trainer.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        losses.append(float(mean_target_nll(logits, b)))
    return sum(losses) / len(losses)


def test_short_training_beats_the_identity_editor_on_held_out_facts(tiny_tokenizer):
    # init_range 0.3: with the default 0.02 a 32-dim random head cannot express a confident prediction
    tiny_llama = make_tiny_llama(len(tiny_tokenizer), init_range=0.3)
    torch.manual_seed(0)
    cfg = TrainConfig(data=[FACTS], steps=40, edits_per_step=4, lr=1e-3, lr_lr=0.2, c_edit=1.0, c_loc=0.1,
                      mend=MendConfig(rank=16, last_blocks=2))
    trainer = EditorTrainer(cfg, LoadedModel(tiny_llama, tiny_tokenizer, "tiny", "memory"))
    train_recs, val_recs = split_records(load_records(FACTS), 0.25, seed=0)
    untrained = held_out_nll(trainer, val_recs)
    rng = random.Random(0)
    for _ in range(cfg.steps):
        trainer.step(rng.sample(train_recs, cfg.edits_per_step))
    trained = held_out_nll(trainer, val_recs)
    assert trained < 0.8 * untrained, (untrained, trained)


def test_train_writes_a_loadable_checkpoint_history_and_plot(tiny_gpt2, tiny_tokenizer, tmp_path):
    cfg = TrainConfig(data=[FACTS], out=str(tmp_path / "ed"), val_size=4, steps=6, val_every=3,
                      edits_per_step=2, mend=MendConfig(rank=8, last_blocks=1, factor_tokens="subject"))
    history = train(cfg, LoadedModel(tiny_gpt2, tiny_tokenizer, "tiny", "memory"))
    out = tmp_path / "ed"
    assert {"editor.safetensors", "editor_config.json", "history.json", "training.png"} <= {
        p.name for p in out.iterdir()}
    assert len(history["train"]) == 6 and [v["step"] for v in history["val"]] == [3, 6]
    saved = json.loads((out / "editor_config.json").read_text())
    assert saved["mend"]["factor_tokens"] == "subject" and saved["training"]["step"] in (3, 6)
    editor = MendEditor.load(out, trainer_stack(tiny_gpt2, saved["mend"]["targets"]))
    assert editor.config.rank == 8
    # the bf16-rounded fingerprint beside the exact one: the same model loaded in bf16 accepts the editor
    bf16 = tiny_gpt2.to(torch.bfloat16)
    assert saved["weights_fingerprint"] and saved["model_fingerprint"] == editor.fingerprint
    assert MendEditor.load(out, trainer_stack(bf16, saved["mend"]["targets"])).config.rank == 8


def trainer_stack(model, names):
    from editor_core.stack import EditStack
    from editor_core.targets import resolve_targets

    return EditStack(model, resolve_targets(model, names))


def test_prefix_cache_gives_the_same_loss_as_recomputing(tiny_llama, tiny_tokenizer):
    records = load_records(FACTS)[:4]
    losses = []
    for cached in (True, False):
        torch.manual_seed(0)
        cfg = TrainConfig(data=[FACTS], prefix_cache=cached, mend=MendConfig(rank=8, last_blocks=2))
        trainer = EditorTrainer(cfg, LoadedModel(tiny_llama, tiny_tokenizer, "tiny", "memory"))
        trainer.step(records)  # fills the cache on the first call
        losses.append(trainer.step(records))
        assert len(trainer.cache) == (0 if not cached else len(trainer.cache)) and (len(trainer.cache) > 0) == cached
    assert abs(losses[0]["loss"] - losses[1]["loss"]) < 1e-5


def test_sigterm_stops_training_and_keeps_the_best_checkpoint(tiny_gpt2, tiny_tokenizer, tmp_path, monkeypatch):
    import os
    import signal

    real_step = EditorTrainer.step
    calls = []

    def step_then_terminate(self, records, others=()):
        calls.append(1)
        if len(calls) == 3:  # as a time limit or a process manager would
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, records, others)

    monkeypatch.setattr(EditorTrainer, "step", step_then_terminate)
    before = signal.getsignal(signal.SIGTERM)
    cfg = TrainConfig(data=[FACTS], out=str(tmp_path / "ed"), val_size=4, steps=50, val_every=1,
                      edits_per_step=2, mend=MendConfig(rank=8, last_blocks=1))
    history = train(cfg, LoadedModel(tiny_gpt2, tiny_tokenizer, "tiny", "memory"))
    assert len(history["train"]) == 3  # the step under way finished, the run did not go on to 50
    assert (tmp_path / "ed" / "editor.safetensors").is_file() and (tmp_path / "ed" / "training.png").is_file()
    assert signal.getsignal(signal.SIGTERM) is before


def _resolving_trainer(tiny_llama, tiny_tokenizer, tmp_path, **train):
    """A trainer whose edits are re-solved against statistics of block 2's output projection (block 3's, at
    the subject, reaches no target logit: its gradient there is zero)."""
    from editor_core.stats import collect_key_stats

    texts = [r.prompt + " " + r.ground_truth for r in load_records(FACTS) if r.ground_truth]
    stats_file = collect_key_stats(tiny_llama, tiny_tokenizer, texts, [2], progress=False).save(tmp_path / "ks.safetensors")
    mend = MendConfig(rank=8, last_blocks=2, factor_tokens="subject", preserve_lambda=1.0, preserve_keys="last")
    cfg = TrainConfig(data=[FACTS], stats=str(stats_file), mend=mend, **train)
    return EditorTrainer(cfg, LoadedModel(tiny_llama, tiny_tokenizer, "tiny", "memory"))


def test_training_through_the_re_solve_proposes_what_one_inference_pass_writes(tiny_llama, tiny_tokenizer, tmp_path):
    trainer = _resolving_trainer(tiny_llama, tiny_tokenizer, tmp_path)
    (solved,) = trainer.inverses  # block 2's output projection; the other targets keep MEND's sum
    record = load_records(FACTS)[2]
    trained, _ = trainer._edit_updates([record])
    assert trained[solved].dense().abs().max() > 0
    assert trained[solved].rank == 1  # one key: the subject's last token
    inference = trainer.editor.compute_delta(trainer.model, trainer.tok, [record.to_request()]).updates
    for name, update in trained.items():  # the default config runs one pass, unscaled
        assert torch.allclose(update.dense(), inference[name].dense(), atol=1e-6), name
    # the solve is differentiable in the nets: the solved update carries gradient to its step size
    trained[solved].dense().abs().sum().backward()  # (a sum of squares of updates this small underflows)
    assert trainer.editor.nets.log_lr.grad[trainer.editor.nets.target_names.index(solved)] != 0


def test_training_through_the_re_solve_saves_the_statistics_the_editor_loads(tiny_llama, tiny_tokenizer, tmp_path):
    out = tmp_path / "ed"
    trainer = _resolving_trainer(tiny_llama, tiny_tokenizer, tmp_path, out=str(out), val_size=4, steps=2, val_every=2,
                                 edits_per_step=2)
    history = train(trainer.cfg, LoadedModel(tiny_llama, tiny_tokenizer, "tiny", "memory"))
    assert all("take" in v for v in (history["unedited"], *history["val"]))  # greedy_rows: tests/core/test_batching.py
    editor = MendEditor.load(out, trainer_stack(tiny_llama, trainer.cfg.mend.targets))
    assert list(editor.preserved) == list(trainer.inverses)  # re-solved at inference against the copied statistics


def test_training_with_a_re_solve_needs_statistics_and_last_keys(tiny_llama, tiny_tokenizer):
    lm = LoadedModel(tiny_llama, tiny_tokenizer, "tiny", "memory")
    with pytest.raises(ValueError, match="--stats"):
        EditorTrainer(TrainConfig(data=[FACTS], mend=MendConfig(rank=8, preserve_lambda=1.0, preserve_keys="last")), lm)
    with pytest.raises(ValueError, match="preserve_keys"):
        EditorTrainer(TrainConfig(data=[FACTS], stats="x", mend=MendConfig(rank=8, preserve_lambda=1.0)), lm)


def _frozen_trainer(tiny_llama, tiny_tokenizer, tmp_path, **train):
    """A re-solving trainer whose nets do not move (lr 0), so a step's edit can be recomputed after it."""
    return _resolving_trainer(tiny_llama, tiny_tokenizer, tmp_path, lr=0.0, lr_lr=0.0, **train)


def test_a_sequence_edits_the_model_its_earlier_steps_left_and_asks_them_to_hold(tiny_llama, tiny_tokenizer, tmp_path):
    trainer = _frozen_trainer(tiny_llama, tiny_tokenizer, tmp_path, sequence=3, c_keep=1.0)
    first, second, third = load_records(FACTS)[2:3], load_records(FACTS)[4:5], load_records(FACTS)[5:6]
    assert "keep_nll" not in trainer.step(first)
    stats = trainer.step(second)
    first_edit, second_edit = trainer.applied  # both stay applied for the sequence's third step
    trainer.editor.nets.eval()  # the input normalisers as the steps left them (training mode updates them)
    with torch.no_grad():
        with added_updates(trainer.model, first_edit.updates):
            on_edited, _ = trainer._edit_updates(second, [first_edit])
        alone, _ = trainer._edit_updates(second)  # the second edit as the unedited model would get it
        b = build_batch(trainer.tok, [first[0].prompt], [first[0].target_new])
        with added_updates(trainer.model, applied_updates(trainer.applied)):
            held = float(mean_target_nll(trainer.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b))
    solved = next(iter(trainer.inverses))
    for name, update in second_edit.updates.items():  # the step edited the model the first edit left
        assert torch.allclose(update.dense(), on_edited[name].dense(), atol=1e-6), name
    assert not torch.allclose(second_edit.updates[solved].dense(), alone[solved].dense(), atol=1e-6)
    assert stats["keep_nll"] == pytest.approx(held, rel=1e-4)  # the first edit's NLL with both applied
    trainer.step(third)
    assert trainer.applied == []  # a sequence of 3 ends: the next step edits the unedited model


def test_locality_against_the_unedited_model_charges_the_whole_sequence(tiny_llama, tiny_tokenizer, tmp_path):
    from editor_core.batching import kl_pre_post, target_positions

    first, second = load_records(FACTS)[2:3], load_records(FACTS)[4:5]
    kls = {}
    for against in ("step", "unedited"):
        trainer = _frozen_trainer(tiny_llama, tiny_tokenizer, tmp_path, sequence=3, loc_against=against)
        with torch.no_grad():  # edits large enough to move the neighbours well above float rounding
            trainer.editor.nets.log_lr += 6.0
        trainer.step(first)
        kls[against] = trainer.step(second)["loc_kl"]
    applied = applied_updates(trainer.applied)  # both edits, as the steps made them
    pairs = [(lp.prompt, lp.answer) for r in (*second, *first) for lp in r.locality]
    b = build_batch(trainer.tok, [p for p, _ in pairs], [a for _, a in pairs])
    sel = target_positions(b)
    with torch.no_grad():
        pre = torch.log_softmax(trainer._tail(b, sel), -1)  # the unedited model
        with added_updates(trainer.model, applied):
            post = trainer._tail(b, sel)
    expected = float(kl_pre_post(pre, post, torch.ones(post.shape[0])))
    assert kls["unedited"] == pytest.approx(expected, rel=1e-4)  # both edits, both records' neighbours
    assert kls["unedited"] != pytest.approx(kls["step"], rel=1e-3)


def test_other_records_prompts_charge_the_edits_change_of_their_true_answers(tiny_llama, tiny_tokenizer, tmp_path):
    from editor_core.batching import kl_pre_post, target_positions
    from editor_core.train import other_records

    records = load_records(FACTS)
    edit, others = records[2:3], records[6:9]
    trainer = _frozen_trainer(tiny_llama, tiny_tokenizer, tmp_path, c_other=2.0)
    with torch.no_grad():  # an edit large enough to move other prompts well above float rounding
        trainer.editor.nets.log_lr += 6.0
    plain = trainer.step(edit)
    stats = trainer.step(edit, others)
    trainer.editor.nets.eval()  # the step's edit, recomputed as it made it (lr 0: the nets did not move)
    with torch.no_grad():
        updates, _ = trainer._edit_updates(edit)
        b = build_batch(trainer.tok, [r.prompt for r in others], [r.ground_truth for r in others])
        sel = target_positions(b)
        pre = torch.log_softmax(trainer._tail(b, sel), -1)
        with added_updates(trainer.model, updates):
            post = trainer._tail(b, sel)
    expected = float(kl_pre_post(pre, post, torch.ones(post.shape[0])))
    assert expected > 1e-6 and "other_kl" not in plain
    assert stats["other_kl"] == pytest.approx(expected, rel=1e-3)
    assert stats["loss"] == pytest.approx(plain["loss"] + 2.0 * expected, rel=1e-3)
    drawn = other_records(random.Random(0), records, records[:4], 6)  # never the batch's own records
    assert len(drawn) == 6 and not {r.case_id for r in drawn} & {r.case_id for r in records[:4]}
    with pytest.raises(ValueError, match="loc_others"):
        TrainConfig(loc_others=-1)


def test_a_sequence_keeps_the_outputs_at_earlier_edits_keys_with_preserve_keep(tiny_llama, tiny_tokenizer, tmp_path):
    moved = {}
    for keep in (0.0, 100.0):
        trainer = _frozen_trainer(tiny_llama, tiny_tokenizer, tmp_path, sequence=3)
        trainer.cfg.mend.preserve_keep = keep
        trainer.editor.use_statistics(KeyStats.load(trainer.cfg.stats), trainer.model)  # KeptInverse at this keep
        trainer.step(load_records(FACTS)[2:3])
        (applied,) = trainer.applied
        with torch.no_grad(), added_updates(trainer.model, applied.updates):
            updates, _ = trainer._edit_updates(load_records(FACTS)[4:5], trainer.applied)
        moved[keep] = {n: float((applied.keys[n] @ updates[n].dense().t()).norm()) for n in trainer.inverses}
    for name in moved[0.0]:  # the second edit changes the first one's output far less where it is kept
        assert moved[100.0][name] < 0.2 * moved[0.0][name], moved


def test_stacked_validation_of_one_record_is_its_single_edit_and_training_reports_it(tiny_llama, tiny_tokenizer, tmp_path):
    trainer = _frozen_trainer(tiny_llama, tiny_tokenizer, tmp_path, val_stacked=True)
    one = load_records(FACTS)[2:3]
    val = trainer.validate(one)
    for k in ("efficacy", "paraphrase", "neighborhood", "take"):
        assert val[f"stacked_{k}"] == val[k], k
    out = tmp_path / "seq"
    trainer.cfg.out, trainer.cfg.val_size, trainer.cfg.steps, trainer.cfg.val_every = str(out), 4, 2, 2
    trainer.cfg.sequence, trainer.cfg.lr, trainer.cfg.init_from = 2, 1e-3, None
    history = train(trainer.cfg, LoadedModel(tiny_llama, tiny_tokenizer, "tiny", "memory"))
    (val,) = history["val"]
    assert "keep_nll" in history["train"][1] and "stacked_take" in val
    card = (out / "card.md").read_text()
    assert "2 steps applied one after another per sequence" in card and "earlier edits' NLL 0.1" in card
    assert val["score"] == pytest.approx((val["stacked_score"] + (val["efficacy"] + val["paraphrase"]
                                                                   + val["neighborhood"]) / 3) / 2)


def test_a_sequence_must_hold_at_least_one_edit(tmp_path, caplog):
    import argparse

    from editor_core.train import add_arguments, run

    with pytest.raises(ValueError, match="sequence"):
        TrainConfig(data=[FACTS], sequence=0)
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--data", FACTS, "--sequence", "0", "--out", str(tmp_path / "ed")])) == 2
    assert "sequence must be >= 1" in caplog.text and not (tmp_path / "ed").exists()  # refused before any work
