import argparse
import json

import pytest
import torch
from conftest import FIXTURES

from editor_core.baselines import FTConfig, FTEditor
from editor_core.data import EditRecord, LocalityPair, load_records
from editor_core.delta import EditDelta, LowRankUpdate
from editor_core.evaluate import add_arguments, evaluate, format_table, run
from editor_core.scoring import score_targets
from editor_core.stack import EditStack
from editor_core.targets import resolve_targets


@pytest.fixture
def records():
    return load_records(FIXTURES / "facts.json")


class FixedEditor:
    """Returns the same delta for every call and records what it was asked and what was applied."""

    method = "fixed"

    def __init__(self, stack, scale: float = 0.0, seed: int = 0):
        self.stack, self.calls, self.active_seen = stack, [], []
        g = torch.Generator().manual_seed(seed)
        self.updates = {} if scale == 0 else {
            n: LowRankUpdate(scale * torch.randn(2, t.d_out, generator=g), torch.randn(2, t.d_in, generator=g))
            for n, t in stack.targets.items()
        }

    def compute_delta(self, model, tokenizer, requests):
        self.calls.append([r.prompt for r in requests])
        self.active_seen.append(list(self.stack.active_ids))
        return EditDelta(dict(self.updates), self.stack.fingerprint, {"method": self.method})


def test_pre_metrics_match_hand_computed_scores(tiny_llama, tiny_tokenizer, records):
    recs = records[:4]
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    rep = evaluate(tiny_llama, tiny_tokenizer, stack, None, recs, progress=False)

    def lp(prompt, cont):
        return score_targets(tiny_llama, tiny_tokenizer, [prompt], [cont])[0]

    eff = [float(lp(r.prompt, r.target_new).mean_logprob > lp(r.prompt, r.ground_truth).mean_logprob) for r in recs]
    para = [float(lp(r.rephrases[0], r.target_new).mean_logprob > lp(r.rephrases[0], r.ground_truth).mean_logprob)
            for r in recs]
    nbh = [float(lp(r.locality[0].prompt, r.locality[0].answer).mean_logprob
                 > lp(r.locality[0].prompt, r.target_new).mean_logprob) for r in recs]
    acc = [lp(r.prompt, r.target_new).token_acc for r in recs]
    assert [row["pre"]["efficacy"] for row in rep.rows] == eff
    assert rep.pre["efficacy"] == pytest.approx(sum(eff) / 4)
    assert rep.pre["paraphrase"] == pytest.approx(sum(para) / 4)
    assert rep.pre["neighborhood"] == pytest.approx(sum(nbh) / 4)
    assert rep.pre["efficacy_acc"] == pytest.approx(sum(acc) / 4)
    assert 0 < sum(eff) + sum(nbh) < 8  # a mix of outcomes, so the comparisons were really exercised
    assert rep.post == {} and rep.edit_ms == {} and rep.method is None
    assert "locality_acc" not in rep.pre


def test_paraphrase_is_mean_over_rephrases_and_missing_parts_are_skipped(tiny_llama, tiny_tokenizer):
    r = EditRecord("x", "The twin city of Cairo is", None, "Baghdad", "Beirut",
                   rephrases=("Cairo is paired with", "Cairo's twin city is", "The sister city of Cairo is"))
    no_truth = EditRecord("y", "Apple A5 was created by", None, "Google", None)
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    rep = evaluate(tiny_llama, tiny_tokenizer, stack, None, [r, no_truth], progress=False)
    wins = [float(score_targets(tiny_llama, tiny_tokenizer, [p], ["Baghdad"])[0].mean_logprob
                  > score_targets(tiny_llama, tiny_tokenizer, [p], ["Beirut"])[0].mean_logprob) for p in r.rephrases]
    assert rep.rows[0]["pre"]["paraphrase"] == pytest.approx(sum(wins) / 3)
    assert rep.rows[1]["pre"]["efficacy"] is None and rep.rows[1]["pre"]["neighborhood"] is None
    assert rep.pre["efficacy"] == rep.rows[0]["pre"]["efficacy"]  # mean over records that have it
    assert rep.pre["neighborhood"] is None


def test_null_edit_changes_nothing(tiny_llama, tiny_tokenizer, records):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    rep = evaluate(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), records[:3], progress=False)
    assert rep.post["locality_acc"] == 1.0
    for k, v in rep.pre.items():
        assert rep.post[k] == v


def test_locality_acc_counts_unchanged_argmax_tokens(tiny_llama, tiny_tokenizer, records):
    recs = records[:3]
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = FixedEditor(stack, scale=0.5, seed=1)
    rep = evaluate(tiny_llama, tiny_tokenizer, stack, editor, recs, progress=False)
    prompts = [r.locality[0].prompt for r in recs]
    answers = [r.locality[0].answer for r in recs]
    pre = score_targets(tiny_llama, tiny_tokenizer, prompts, answers)
    with stack.applied(EditDelta(editor.updates, stack.fingerprint)):
        post = score_targets(tiny_llama, tiny_tokenizer, prompts, answers)
    expected = [sum(a == b for a, b in zip(p.argmax_ids, q.argmax_ids, strict=True)) / len(p.argmax_ids)
                for p, q in zip(pre, post, strict=True)]
    assert [row["post"]["locality_acc"] for row in rep.rows] == pytest.approx(expected)
    assert min(expected) < 1.0  # the scrambling edit really changed some argmax


def test_ft_reaches_full_efficacy_and_restores_weights(tiny_model, tiny_tokenizer, records):
    recs = records[:2]
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    sha = stack.sha256()
    editor = FTEditor(stack, FTConfig(lr=1e-2, max_steps=40))
    rep = evaluate(tiny_model, tiny_tokenizer, stack, editor, recs, progress=False)
    assert rep.pre["efficacy_acc"] < 1.0
    assert rep.post["efficacy"] == 1.0 and rep.post["efficacy_acc"] == 1.0
    assert rep.method == "ft" and rep.edit_ms["n"] == 2 and rep.edit_ms["median"] > 0
    assert stack.sha256() == sha and stack.active_ids == []


def test_batch_mode_calls_compute_delta_once_per_batch(tiny_llama, tiny_tokenizer, records):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = FixedEditor(stack, scale=0.01)
    recs = records[:5]
    rep = evaluate(tiny_llama, tiny_tokenizer, stack, editor, recs, batch_size=2, progress=False)
    assert [len(c) for c in editor.calls] == [2, 2, 1]
    assert editor.calls[0] == [recs[0].prompt, recs[1].prompt]
    assert editor.active_seen == [[], [], []]  # reverted before the next batch
    assert rep.edit_ms["n"] == 3 and len(rep.rows) == 5 and all("post" in row for row in rep.rows)


def test_sequential_stacks_edits_then_restores_the_entry_state(tiny_model, tiny_tokenizer, records):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    keep = FixedEditor(stack, scale=0.02, seed=5)
    stack.apply("user-edit", EditDelta(keep.updates, stack.fingerprint))
    entry_sha = stack.sha256()
    editor = FixedEditor(stack, scale=0.01)
    evaluate(tiny_model, tiny_tokenizer, stack, editor, records[:5], sequential=3, progress=False)
    assert editor.active_seen == [
        ["user-edit"], ["user-edit", "__eval-0"], ["user-edit", "__eval-0", "__eval-1"],
        ["user-edit"], ["user-edit", "__eval-3"],
    ]
    assert stack.active_ids == ["user-edit"] and stack.sha256() == entry_sha


def test_stack_restored_when_editor_fails(tiny_llama, tiny_tokenizer, records):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    sha = stack.sha256()
    editor = FixedEditor(stack, scale=0.01)
    inner = editor.compute_delta

    def flaky(model, tok, reqs):
        if len(editor.calls) == 1:
            raise RuntimeError("boom")
        return inner(model, tok, reqs)

    editor.compute_delta = flaky
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(tiny_llama, tiny_tokenizer, stack, editor, records[:3], sequential=3, progress=False)
    assert stack.active_ids == [] and stack.sha256() == sha


def test_report_json_and_table(tiny_llama, tiny_tokenizer, records):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    rep = evaluate(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack, 0.01), records[:2], progress=False)
    doc = json.loads(rep.to_json())
    assert doc["n_records"] == 2 and doc["rows"][0]["case_id"] == "1"
    assert set(doc["post"]) == {"efficacy", "paraphrase", "neighborhood", "efficacy_acc", "paraphrase_acc",
                                "locality_acc", "success", "paraphrase_success", "truth_success",
                                "truth_paraphrase_success", "neighbour_kept"}
    table = format_table(rep)
    assert "efficacy" in table and "locality_acc" in table and "edit_ms" in table


def test_truth_success_reads_the_old_answer_s_greedy_on_the_prompt_and_each_rephrase():
    from editor_core.evaluate import RecordScores, record_metrics
    from editor_core.scoring import TargetScore

    hit, miss = TargetScore(-0.1, 1.0, (5,)), TargetScore(-3.0, 0.5, (7, 8))
    m = record_metrics(RecordScores(new=miss, truth=hit, rephrase=[(miss, hit), (hit, miss)], locality=[]))
    assert (m["truth_success"], m["truth_paraphrase_success"]) == (1.0, 0.5)
    assert (m["success"], m["paraphrase_success"]) == (0.0, 0.5)
    # a record without a ground truth has no old answer to read
    m = record_metrics(RecordScores(new=hit, truth=None, rephrase=[(hit, None)], locality=[]))
    assert m["truth_success"] is None and m["truth_paraphrase_success"] is None and m["success"] == 1.0


# ---- CLI -------------------------------------------------------------------------------------------
def parse(*argv):
    p = argparse.ArgumentParser(prog="mend eval")
    add_arguments(p)
    return p.parse_args(list(argv))



def test_cli_runs_ft_and_writes_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r" / "report.json"
    args = parse("--model", str(tiny_model_dir), "--method", "ft", "--data", str(FIXTURES / "facts.json"),
                 "--limit", "2", "--batch-size", "2", "--json", str(out), "--no-progress", "--ft-lr", "1e-2")
    assert run(args) == 0
    assert "efficacy" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["n_records"] == 2 and doc["edit_ms"]["n"] == 1 and doc["meta"]["model"] == str(tiny_model_dir)
    assert doc["meta"]["targets"][0].startswith("model.layers.")
    assert doc["rows"][0]["edit"]["method"] == "ft" and int(doc["rows"][0]["edit"]["steps"]) > 0


def test_cli_mend_uses_the_checkpoint_targets(tiny_model_dir, tmp_path, tiny_llama, capsys):
    from editor_core import checkpoint
    from editor_core.config import MendConfig
    from editor_core.editor import MendEditor

    targets = resolve_targets(tiny_llama, last_blocks=1)
    stack = EditStack(tiny_llama, targets)
    cfg = MendConfig(targets=[t.name for t in targets], rank=8)
    editor = MendEditor.untrained(stack, cfg)
    ckpt = checkpoint.save(tmp_path / "ed", cfg, editor.nets.state_dict(), {"model_fingerprint": stack.fingerprint})
    out = tmp_path / "mend.json"
    args = parse("--model", str(tiny_model_dir), "--editor", str(ckpt), "--data", str(FIXTURES / "facts.json"),
                 "--limit", "2", "--json", str(out), "--no-progress")
    assert run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["method"] == "mend" and doc["meta"]["targets"] == cfg.targets
    assert doc["rows"][1]["edit"]["method"] == "mend"


def test_cli_user_errors_exit_2(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run(parse("--data", str(tmp_path / "missing.json"), "--method", "ft"))
    assert e.value.code == 2 and "missing.json" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        run(parse("--data", str(FIXTURES / "data" / "bad_missing_keys.json"), "--method", "ft"))
    assert e.value.code == 2 and "missing keys" in capsys.readouterr().err

    empty = tmp_path / "empty-target.json"  # a record with nothing to edit to: refused, naming the way out
    facts = json.loads((FIXTURES / "facts.json").read_text())
    facts[0]["target_new"] = ""
    empty.write_text(json.dumps(facts))
    with pytest.raises(SystemExit) as e:
        run(parse("--data", str(empty), "--method", "ft"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "record 0 has an empty prompt or target" in err and "--skip-empty" in err

    monkeypatch.setenv("MEND_EDITORS_DIR", str(tmp_path / "no-editors"))
    with pytest.raises(SystemExit) as e:
        run(parse("--data", str(FIXTURES / "facts.json"), "--model", "some-model"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "mend train" in err and "--method ft" in err

    with pytest.raises(SystemExit) as e:
        parse("--data", "x.json", "--batch-size", "0")
    assert e.value.code == 2


def test_evaluate_accepts_record_with_locality_only(tiny_llama, tiny_tokenizer):
    r = EditRecord("z", "Apple A5 was created by", None, "Google", "Apple",
                   locality=(LocalityPair("Apple II was created by", "Apple"),
                             LocalityPair("The maker of Apple A5 is", "Apple")))
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    rep = evaluate(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), [r], progress=False)
    assert rep.pre["paraphrase"] is None and rep.post["locality_acc"] == 1.0


def test_plot_reports_writes_png(tiny_llama, tiny_tokenizer, records, tmp_path):
    from editor_core.report_plot import plot_reports

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    rep = evaluate(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack, 0.01), records[:2], progress=False)
    saved = tmp_path / "rep.json"
    saved.write_text(rep.to_json())
    out = plot_reports({"fixed": rep, "again": saved}, tmp_path / "plots" / "cmp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
