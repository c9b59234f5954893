"""Scenario 3 at CI size: 16 query + 2 edit clients for a few seconds against a real `mend serve`;
no 5xx, and every response matches an offline replay of the journal to its version."""

from __future__ import annotations

import pytest
from scenarios import load

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_load_no_5xx_and_every_version_matches_its_content(tmp_path):
    figures = load.run(**load.CI, workdir=tmp_path)
    assert figures["problem_count"] == 0, figures["problems"]
    assert figures["5xx"] == 0 and figures["query_latency"]["n"] > 0 and figures["edit_latency"]["n"] > 0
    assert figures["versions_seen"] >= 2 and figures["responses_checked_against_offline_replay"] > 0
