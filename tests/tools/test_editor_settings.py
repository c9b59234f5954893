"""tools.editor_settings writes an editor's inference settings, and a bad one changes nothing."""

from __future__ import annotations

import pytest
import torch

from editor_core import checkpoint
from editor_core.config import MendConfig
from tools import editor_settings


@pytest.fixture
def saved(tmp_path):
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    checkpoint.save(tmp_path, MendConfig(rank=4, targets=names), {"x": torch.ones(2)}, {"model": "tiny"})
    return tmp_path, names


def test_settings_are_written_and_the_nets_untouched(saved):
    path, names = saved
    before = checkpoint.load(path).state
    editor_settings.main([str(path), "--set", "preserve_lambda=15", "preserve_keys=last", "preserve_keep=2",
                          "refine_passes=20", "pass_scale=0.25", "key_prefixes=I read that |Here is a fact: ",
                          f"edit_targets={names[1]}"])
    after = checkpoint.load(path)
    assert (after.config.preserve_lambda, after.config.preserve_keys, after.config.preserve_keep) == (15.0, "last", 2.0)
    assert (after.config.refine_passes, after.config.pass_scale) == (20, 0.25)
    assert after.config.key_prefixes == ["I read that ", "Here is a fact: "]
    assert after.config.edit_targets == [names[1]] and after.config.targets == names
    assert after.info["model"] == "tiny" and torch.equal(after.state["x"], before["x"])


@pytest.mark.parametrize("item, message", [
    ("rank=4", "FIELD one of"),
    ("pass_scale=0", "pass_scale must be > 0"),
    ("refine_passes=2.5", "invalid literal"),
    ("edit_targets=model.layers.7.mlp.down_proj", "not among the editor's targets"),
])
def test_a_bad_setting_is_a_usage_error_and_changes_nothing(saved, item, message, capsys):
    path, _ = saved
    text = (path / checkpoint.CONFIG).read_text()
    with pytest.raises(SystemExit) as exit_info:
        editor_settings.main([str(path), "--set", "refine_passes=3", item])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert (path / checkpoint.CONFIG).read_text() == text


def test_no_checkpoint_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        editor_settings.main([str(tmp_path), "--set", "refine_passes=3"])
    assert exit_info.value.code == 2 and "no editor checkpoint" in capsys.readouterr().err
