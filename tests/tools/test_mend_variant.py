"""tools.mend_variant refuses a setting it cannot try before it loads a model."""

from __future__ import annotations

import pytest

from tools import mend_variant


@pytest.mark.parametrize("item, message", [
    ("rank=4", "FIELD one of"),
    ("pass_scale", "FIELD=VALUE"),
    ("refine_passes=1.5", "invalid literal"),
    ("refine_passes=-1", "refine_passes must be a whole number"),
    ("preserve_lambda=-3", "preserve_lambda must be >= 0"),
    ("pass_scale=0", "pass_scale must be > 0"),
])
def test_bad_settings_are_usage_errors(item, message, capsys, monkeypatch):
    from editor_core import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exit_info:
        mend_variant.main(["--name", "x", "--set", item])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _tiny_editor(model_dir, directory):
    """An untrained MEND editor for the tiny model at ``model_dir`` (its nets are the identity)."""
    from editor_core import checkpoint, models
    from editor_core.config import MendConfig
    from editor_core.editor import MendEditor
    from editor_core.stack import EditStack
    from editor_core.targets import resolve_targets

    lm = models.load(str(model_dir))
    stack = EditStack(lm.model, resolve_targets(lm.model, blocks=[2]))
    editor = MendEditor.untrained(stack, MendConfig(rank=4, blocks=[2], targets=list(stack.targets),
                                                     refine_passes=2, refine_seconds=10.0))
    checkpoint.save(directory, editor.config, editor.nets.state_dict(), {"model_fingerprint": stack.fingerprint})


def test_a_variant_s_delta_cache_serves_the_stage_once_its_settings_are_shipped(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    from conftest import FIXTURES

    from editor_core.stacked import _claim_cache
    from tools import editor_settings
    from tools.results import delta_settings

    editor_dir = tmp_path / "editor"
    _tiny_editor(tiny_model_dir, editor_dir)
    monkeypatch.chdir(tmp_path)  # runs/variants/ is written under the working directory
    cache = tmp_path / "deltas"
    common = ["--model", str(tiny_model_dir), "--editor", str(editor_dir), "--data", str(FIXTURES / "facts.json"),
              "--stacked", "3", "--checkpoints", "3", "--threads", "1", "--delta-dir"]
    assert mend_variant.main(["--name", "v", "--set", "pass_scale=0.5", *common, str(cache)]) == 0
    assert len(list(cache.glob("*.safetensors"))) == 3
    shuffled = tmp_path / "deltas-shuffled"
    assert mend_variant.main(["--name", "s", "--set", "pass_scale=0.5", "--order-seed", "1",
                              *common, str(shuffled)]) == 0

    from editor_core import checkpoint, models
    from editor_core.editor import MendEditor
    from editor_core.stack import EditStack

    lm = models.load(str(tiny_model_dir))
    stack = EditStack(lm.model, checkpoint.stack_targets(lm.model, editor_dir))

    def stage_settings() -> dict:  # what the stacked stage records for the editor as shipped (read again)
        return delta_settings(MendEditor.load(editor_dir, stack))

    with pytest.raises(ValueError, match="other settings"):  # the variant's setting is not shipped yet
        _claim_cache(cache, stage_settings())
    editor_settings.main([str(editor_dir), "--set", "pass_scale=0.5"])
    _claim_cache(cache, stage_settings())  # shipped: the stage takes the variant's deltas
    with pytest.raises(ValueError, match="order_seed"):  # deltas of another order are never re-scored as the stage
        _claim_cache(shuffled, stage_settings())

