"""Scenario 7 at CI size: two real processes on one namespace; the standby refuses edits with the
reason, takes over when the holder is SIGKILLed or frozen past its lock ttl; a resumed zombie refuses."""

from __future__ import annotations

import pytest
from scenarios import two_writers

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_one_writer_at_a_time_and_no_split_brain(tmp_path):
    figures = two_writers.run(**two_writers.CI, workdir=tmp_path)
    assert not figures["problems"], figures["problems"]
    assert figures["refusals_by_code"] == {"not_ready": 2, "writer_unavailable": 1}
    assert figures["final_version"] == figures["acknowledged_edits"] == 8
