"""Concurrent queries during edits and rollbacks: each response's version matches its content."""

from __future__ import annotations

import threading
from collections import defaultdict

from mend_harness import engine_of, fixture_facts, make_settings, query, serving

FACTS = fixture_facts()
PROMPT, TARGET = FACTS[7]["prompt"], FACTS[7]["target_new"]
CANDS = [TARGET, FACTS[7]["ground_truth"]]


def test_every_response_is_served_by_exactly_the_weights_of_its_version(tiny_tokenizer):
    settings = make_settings(max_batch_size=4, max_wait_ms=20.0)
    with serving(settings, tiny_tokenizer) as c:
        reference = {0: query(c, [PROMPT], CANDS)["results"][0]["candidates"]}
        seen: dict[int, list[dict]] = defaultdict(list)
        stop = threading.Event()
        errors: list = []

        def hammer():
            try:
                while not stop.is_set():
                    out = query(c, [PROMPT, "Hello there"], CANDS, max_new_tokens=2)
                    seen[out["version"]].append(out["results"][0]["candidates"])
            except Exception as err:  # surfaced below
                errors.append(err)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        ids = []
        for fact in (FACTS[7], FACTS[0], FACTS[7]):  # the third re-edits the same prompt
            r = c.post("/edit", json={"requests": [{"prompt": fact["prompt"], "target": fact["target_new"]}],
                                      "method": "ft"})
            assert r.status_code == 200, r.text
            ids.append(r.json()["edit_id"])
            reference[r.json()["version"]] = query(c, [PROMPT], CANDS)["results"][0]["candidates"]
        r = c.post("/rollback", json={"edit_id": ids[0]})
        reference[r.json()["version"]] = query(c, [PROMPT], CANDS)["results"][0]["candidates"]
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert engine_of(c).version == 4

        # versions really differ in what they answer (so the check below is not vacuous)
        for v in range(1, 5):
            assert any(abs(reference[v][k] - reference[v - 1][k]) > 1e-3 for k in CANDS), (v, reference)
        assert len(seen) >= 2, "queries should have been served by several versions"
        for version, answers in seen.items():
            for cands in answers:
                for k in CANDS:
                    assert abs(cands[k] - reference[version][k]) < 1e-4, (version, cands, reference[version])
        batches = c.app.state.metrics.batch_size.collect()[0].samples
        count = next(s.value for s in batches if s.name.endswith("_count"))
        total = next(s.value for s in batches if s.name.endswith("_sum"))
        assert total > count, "some micro-batch should hold more than one prompt"
