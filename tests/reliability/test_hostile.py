"""Scenario 4 at CI size: schemathesis (positive and negative, four auth variants) plus hand-written
hostile bodies against a real `mend serve`: no 5xx, and no refused request changes the journal."""

from __future__ import annotations

import pytest

pytest.importorskip("schemathesis")
from scenarios import hostile  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_generated_and_hostile_requests_never_5xx_nor_change_the_journal_when_refused(tmp_path):
    figures = hostile.run(**hostile.CI, workdir=tmp_path)
    assert figures["problem_count"] == 0, figures["problems"]
    assert figures["generated_requests"] >= 150 and figures["5xx"] == 0
    assert not figures["manual_connection_closed"]
    assert all(figures["manual_statuses"][n] == 413 for n in figures["manual_statuses"] if n.startswith("1 MB"))
