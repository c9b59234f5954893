import json

import pytest
import torch
from conftest import FIXTURES

from editor_core import checkpoint
from editor_core.blend import blend, blend_states
from editor_core.config import MendConfig
from editor_core.data import load_records
from editor_core.editor import STATS_FILE, MendEditor
from editor_core.stack import EditStack
from editor_core.targets import resolve_targets


def _editors(tiny_llama, tmp_path, blocks=(2,)):
    """An untrained editor (identity nets) and one whose nets were moved, as training would, saved."""
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama, blocks=list(blocks)))
    cfg = MendConfig(rank=4, blocks=list(blocks), targets=list(stack.targets))
    start = MendEditor.untrained(stack, cfg)
    trained = MendEditor.untrained(stack, cfg)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in trained.nets.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    info = {"model_fingerprint": stack.fingerprint, "editor_id": "tiny"}
    a = checkpoint.save(tmp_path / "start", cfg, start.nets.state_dict(), info)
    b = checkpoint.save(tmp_path / "trained", cfg, trained.nets.state_dict(), info)
    return stack, a, b


def test_a_blend_is_the_weighted_mean_of_the_nets_and_its_ends_edit_as_the_editors_do(tiny_llama, tiny_tokenizer,
                                                                                      tmp_path):
    stack, a, b = _editors(tiny_llama, tmp_path)
    (b / STATS_FILE).write_bytes(b"statistics")  # the trained editor's own statistics go with the blend
    out = blend(a, b, 0.25, tmp_path / "mix")
    mixed, start, trained = checkpoint.load(out), checkpoint.load(a), checkpoint.load(b)
    moved = [n for n in mixed.state if not torch.equal(start.state[n], trained.state[n])]
    assert moved
    for name in moved:
        assert torch.allclose(mixed.state[name], 0.75 * start.state[name] + 0.25 * trained.state[name], atol=1e-6)
    doc = json.loads((out / checkpoint.CONFIG).read_text())
    assert doc["blend"]["weight"] == 0.25 and doc["editor_id"] == "tiny-blend0.25"
    assert (out / STATS_FILE).read_bytes() == b"statistics"
    (b / STATS_FILE).unlink()  # a trained editor without statistics of its own: none are left behind in out
    assert not (blend(a, b, 0.25, out) / STATS_FILE).exists()

    request = load_records(FIXTURES / "facts.json")[2].to_request()
    for weight, end in ((0.0, a), (1.0, b)):  # the ends edit exactly as the two editors
        made = MendEditor.load(blend(a, b, weight, tmp_path / f"end{weight:g}"), stack)
        delta = made.compute_delta(stack.model, tiny_tokenizer, [request]).updates
        expected = MendEditor.load(end, stack).compute_delta(stack.model, tiny_tokenizer, [request]).updates
        for name, update in delta.items():
            assert torch.equal(update.dense(), expected[name].dense()), (weight, name)


def test_a_blend_refuses_a_weight_outside_0_1_and_nets_of_other_weights(tiny_llama, tmp_path, caplog):
    import argparse

    from editor_core.blend import add_arguments, run

    _, a, b = _editors(tiny_llama, tmp_path)
    with pytest.raises(ValueError, match="within"):
        blend_states(checkpoint.load(a).state, checkpoint.load(b).state, 1.5)
    _, other, _ = _editors(tiny_llama, tmp_path / "other", blocks=(1,))
    with pytest.raises(ValueError, match="different weights"):
        blend(a, other, 0.5, tmp_path / "x")
    state = checkpoint.load(b).state
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="different tensors"):
        blend_states(checkpoint.load(a).state, state, 0.5)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(a), str(tmp_path / "missing"), "--weight", "0.5", "--out", str(tmp_path / "y")])) == 2
    assert "no editor checkpoint" in caplog.text and not (tmp_path / "y").exists()


def test_a_blend_of_only_the_step_sizes_keeps_the_starts_nets_and_refuses_an_unknown_tensor(tiny_llama, tmp_path):
    _, a, b = _editors(tiny_llama, tmp_path)
    out = blend(a, b, 0.5, tmp_path / "lr", only=["log_lr"])
    mixed, start, trained = checkpoint.load(out), checkpoint.load(a), checkpoint.load(b)
    assert not torch.equal(start.state["log_lr"], trained.state["log_lr"])
    torch.testing.assert_close(mixed.state["log_lr"], 0.5 * (start.state["log_lr"] + trained.state["log_lr"]))
    others = [n for n in mixed.state if n != "log_lr"]
    assert any(not torch.equal(start.state[n], trained.state[n]) for n in others)  # the nets did move
    assert all(torch.equal(mixed.state[n], start.state[n]) for n in others)  # and the blend kept the start's
    doc = json.loads((out / checkpoint.CONFIG).read_text())
    assert doc["blend"]["only"] == ["log_lr"] and doc["editor_id"] == "tiny-blend0.5-log_lr"
    with pytest.raises(ValueError, match="no tensor 'lr'"):
        blend_states(start.state, trained.state, 0.5, only=["lr"])
