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
