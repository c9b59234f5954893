"""Scenario 5: non-finite and exploding edits are refused with a clear 422 and change nothing.

An editor that returns NaN / inf / huge factors is plugged into the real app (in-process, real
redis-server); each /edit must answer 422 ``edit_rejected`` with a message saying why, and leave the
weights (sha256), the version and the journal exactly as they were. A normal edit still works after.

    python tests/reliability/scenarios/non_finite.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from harness import FACTS, edit_body, scenario_main, tiny_tokenizer  # noqa: E402
from mend_harness import make_settings, serving, tiny_editors  # noqa: E402

from editor_core.delta import EditDelta, LowRankUpdate  # noqa: E402

# case -> (factor value, settings overrides, what the message must say)
CASES = {
    "nan": (float("nan"), {}, "non-finite"),
    "inf": (float("inf"), {}, "non-finite"),
    "exploding (1e4 x weight norm)": (1e4, {}, "exploding"),
    "overflowing activations (ratio guard off)": (1e18, {"max_update_ratio": 1e300}, "non-finite"),
}


class BadEditor:
    """Returns a rank-1 update filled with ``value`` on every target."""

    method = "ft"

    def __init__(self, stack, value: float):
        self.stack, self.value = stack, value

    def compute_delta(self, model, tokenizer, requests) -> EditDelta:
        ups = {n: LowRankUpdate(torch.full((1, d_out), self.value), torch.ones(1, d_in))
               for n, (d_out, d_in) in self.stack.shapes.items()}
        return EditDelta(ups, self.stack.fingerprint, {"method": "bad"})


def run() -> dict:
    tok = tiny_tokenizer()
    figures: dict = {"cases": {}, "problems": []}
    for name, (value, overrides, must_say) in CASES.items():
        def editors(stack, model, tokenizer, settings, value=value):
            return tiny_editors(stack, model, tokenizer, settings) | {"mend": BadEditor(stack, value)}

        with serving(make_settings(**overrides), tok, editors=editors) as c:
            runtime = c.app.state.runtime
            ok = c.post("/edit", json=edit_body(0))  # one good edit first: the journal is not empty
            before = (runtime.engine.version, runtime.engine.stack.sha256(), runtime.journal.head(),
                      runtime.journal.count_edits())
            r = c.post("/edit", json=edit_body(1, key=f"bad-{value}", method="mend"))
            after = (runtime.engine.version, runtime.engine.stack.sha256(), runtime.journal.head(),
                     runtime.journal.count_edits())
            body = r.json()
            figures["cases"][name] = {"status": r.status_code, "code": body.get("code"),
                                      "detail": body.get("detail")}
            if ok.status_code != 200:
                figures["problems"].append(f"{name}: good edit failed {ok.text[:200]}")
            if r.status_code != 422 or body.get("code") != "edit_rejected" or must_say not in body.get("detail", ""):
                figures["problems"].append(f"{name}: {r.status_code} {body}")
            if after != before:
                figures["problems"].append(f"{name}: state changed {before} -> {after}")
            if runtime.journal.edit_for_idempotency_key(f"bad-{value}") is not None:
                figures["problems"].append(f"{name}: idempotency key journaled")
            q = c.post("/query", json={"prompts": [FACTS[1]["prompt"]], "candidates": [FACTS[1]["target_new"]]})
            score = q.json()["results"][0]["candidates"][FACTS[1]["target_new"]]
            if q.status_code != 200 or not math.isfinite(score):
                figures["problems"].append(f"{name}: model unusable after the refusal: {q.text[:200]}")
            again = c.post("/edit", json=edit_body(2))
            if again.status_code != 200 or again.json()["version"] != before[0] + 1:
                figures["problems"].append(f"{name}: next good edit {again.status_code} {again.text[:200]}")
    return figures


def main() -> int:
    return scenario_main("non-finite / exploding edits", run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
