"""Scenario 1 at CI size: SIGKILL the real `mend serve` process during a stream of edits from 4 clients."""

from __future__ import annotations

import pytest
from scenarios import crash

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_sigkill_during_edits_loses_nothing_acknowledged_and_half_applies_nothing(tmp_path):
    figures = crash.run(**crash.CI, workdir=tmp_path)
    assert not figures["problems"], figures["problems"]
    assert figures["kills"] == crash.CI["kills"] and figures["acknowledged_edits"] >= crash.CI["edits"]
    assert figures["acknowledged_rollbacks"] >= 1
    assert figures["checks"] == crash.CI["kills"] + 1
