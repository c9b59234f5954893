import pytest
import torch

from editor_core import checkpoint
from editor_core.config import MendConfig
from editor_core.editor import MendEditor
from editor_core.stack import EditStack
from editor_core.targets import resolve_targets


def test_stack_targets_follow_the_editor_checkpoint(tiny_llama, tmp_path):
    cfg = MendConfig(blocks=[1], rank=4)
    names = [t.name for t in resolve_targets(tiny_llama, blocks=[1])]
    cfg.targets = names
    checkpoint.save(tmp_path, cfg, {"x": torch.zeros(1)}, {"model": "tiny"})
    assert [t.name for t in checkpoint.stack_targets(tiny_llama, tmp_path)] == names
    default = [t.name for t in checkpoint.stack_targets(tiny_llama, None)]
    assert default == [t.name for t in resolve_targets(tiny_llama)] and default != names


def test_saved_editor_round_trips_and_refuses_another_model(tiny_llama, tiny_gpt2, tmp_path):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = MendEditor.untrained(stack, MendConfig(rank=4, targets=list(stack.targets)))
    with torch.no_grad():
        editor.nets.log_lr.fill_(-3.0)
    checkpoint.save(tmp_path, editor.config, editor.nets.state_dict(), {"model_fingerprint": stack.fingerprint})
    loaded = MendEditor.load(tmp_path, stack)
    assert torch.equal(loaded.nets.log_lr, editor.nets.log_lr)
    other = EditStack(tiny_gpt2, resolve_targets(tiny_gpt2))
    with pytest.raises(ValueError):
        MendEditor.load(tmp_path, other)


def test_missing_or_foreign_checkpoint_gives_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.EditorCheckpointError, match="mend train"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.WEIGHTS).write_bytes(b"")
    (tmp_path / checkpoint.CONFIG).write_text('{"format_version": 99, "mend": {}}')
    with pytest.raises(checkpoint.EditorCheckpointError, match="format_version"):
        checkpoint.load(tmp_path)


def test_editor_loads_into_a_stack_that_also_covers_locate_targets(tiny_llama, tmp_path):
    """The service's stack adds the locate-then-edit layers; the editor still recognises its model."""
    from editor_core.targets import out_proj_targets

    own = EditStack(tiny_llama, resolve_targets(tiny_llama, blocks=[3]))
    editor = MendEditor.untrained(own, MendConfig(rank=4, blocks=[3]))
    checkpoint.save(tmp_path, editor.config, editor.nets.state_dict(), {"model_fingerprint": own.fingerprint})
    wide = EditStack(tiny_llama, resolve_targets(tiny_llama, blocks=[3]) + out_proj_targets(tiny_llama, [1, 2]))
    assert wide.fingerprint != own.fingerprint
    loaded = MendEditor.load(tmp_path, wide)
    assert [t.name for t in loaded.targets] == list(own.targets)  # its own targets, not the extra layers
    assert loaded.fingerprint == wide.fingerprint  # its deltas fit the wide stack


def test_loaded_editor_nets_sit_on_the_models_device(tiny_llama, tmp_path, monkeypatch):
    """A checkpoint loads on the CPU, but the factors come from the model's device: the nets must follow
    it (on CUDA `mend check-gpu` found them left on the CPU: 'Expected all tensors to be on the same
    device'). No second device here, so the model's device is reported as 'meta'."""
    import editor_core.editor as editor_module

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = MendEditor.untrained(stack, MendConfig(rank=4, targets=list(stack.targets)))
    checkpoint.save(tmp_path, editor.config, editor.nets.state_dict(), {"model_fingerprint": stack.fingerprint})
    monkeypatch.setattr(editor_module, "device_of", lambda model: torch.device("meta"))
    for made in (MendEditor.load(tmp_path, stack), MendEditor.untrained(stack, MendConfig(rank=4))):
        assert {t.device.type for t in made.nets.state_dict().values()} == {"meta"}


def test_an_editor_that_re_solves_needs_its_statistics_beside_it(tiny_llama, tiny_gpt2, tiny_tokenizer, tmp_path):
    from conftest import fixture_facts

    from editor_core.editor import STATS_FILE
    from editor_core.stats import collect_key_stats
    from editor_core.targets import out_proj_targets

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = MendEditor.untrained(stack, MendConfig(rank=4, targets=list(stack.targets), preserve_lambda=5.0))
    checkpoint.save(tmp_path, editor.config, editor.nets.state_dict(), {"model_fingerprint": stack.fingerprint})
    with pytest.raises(ValueError, match=STATS_FILE):
        MendEditor.load(tmp_path, stack)
    texts = [f["prompt"] for f in fixture_facts()]
    foreign = collect_key_stats(tiny_gpt2, tiny_tokenizer, texts, [0, 1], progress=False)
    foreign.save(tmp_path / STATS_FILE)
    with pytest.raises(ValueError, match="another model"):
        MendEditor.load(tmp_path, stack)
    collect_key_stats(tiny_llama, tiny_tokenizer, texts, [0, 1], progress=False).save(tmp_path / STATS_FILE)
    loaded = MendEditor.load(tmp_path, stack)
    expected = sorted(t.name for t in out_proj_targets(tiny_llama, [0, 1]) if t.name in editor.config.targets)
    assert expected and sorted(loaded.preserved) == expected


def test_a_re_solving_editor_reads_its_own_statistics_else_the_locate_ones(tiny_llama, tiny_tokenizer, tmp_path):
    from editor_core.editor import STATS_FILE
    from editor_core.stats import STATS_FILE as LOCATE_STATS_FILE
    from editor_core.stats import collect_key_stats
    from editor_core.targets import out_proj_targets

    stack = EditStack(tiny_llama, out_proj_targets(tiny_llama, [0, 1]))
    names = list(stack.targets)
    editor = MendEditor.untrained(stack, MendConfig(rank=4, targets=names, preserve_lambda=1.0))
    checkpoint.save(tmp_path, editor.config, editor.nets.state_dict(), {"model_fingerprint": stack.fingerprint})
    texts = ["Paris is the capital of France.", "The Eiffel Tower stands in Paris."]
    collect_key_stats(tiny_llama, tiny_tokenizer, texts, [0, 1], progress=False).save(tmp_path / LOCATE_STATS_FILE)
    assert sorted(MendEditor.load(tmp_path, stack).preserved) == sorted(names)  # the locate statistics serve
    # the editor's own file, when there is one, wins
    own = collect_key_stats(tiny_llama, tiny_tokenizer, texts, [1], progress=False)
    own.save(tmp_path / STATS_FILE)
    assert list(MendEditor.load(tmp_path, stack).preserved) == [names[1]]
    # statistics that cover none of an editor's targets are refused, not silently unused
    block0 = EditStack(tiny_llama, out_proj_targets(tiny_llama, [0]))
    first_only = MendEditor.untrained(block0, MendConfig(rank=4, targets=names[:1], preserve_lambda=1.0))
    checkpoint.save(tmp_path / "b0", first_only.config, first_only.nets.state_dict(),
                    {"model_fingerprint": block0.fingerprint})
    own.save(tmp_path / "b0" / STATS_FILE)
    with pytest.raises(ValueError, match="covers none"):
        MendEditor.load(tmp_path / "b0", block0)
