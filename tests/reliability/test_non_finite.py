"""Scenario 5: NaN, inf, exploding and activation-overflowing edits -> 422 with a reason; nothing changes."""

from __future__ import annotations

import pytest
from scenarios import non_finite

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_non_finite_and_exploding_edits_are_refused_and_change_nothing():
    figures = non_finite.run()
    assert not figures["problems"], figures["problems"]
    assert set(figures["cases"]) == set(non_finite.CASES)
