"""Post N CounterFact corrections to a running service one after another, then ask for every one.

    python -m tools.corrections_demo --base http://127.0.0.1:8011 --n 20

What an application does: one POST /edit per fact (with its subject), in order, each on the weights
the previous ones left; then POST /query for every edited prompt and for each fact's neighbour
prompt. Prints one line per fact and a summary, for the README's session.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import httpx

log = logging.getLogger("corrections_demo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--offset", type=int, default=0, help="first record of --data to use")
    p.add_argument("--method", default=None, help="edit method (default: the service's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    records = json.loads(open(args.data).read())[args.offset : args.offset + args.n]
    http = httpx.Client(base_url=args.base, timeout=300)
    before = _ask(http, [r["locality_prompt"] for r in records], 4)  # the neighbours, before any edit
    ready = http.get("/health/ready").json()
    log.info("service: model %s, default method %s, version %s", ready["model"], ready["default_method"],
             ready["version"])
    accepted = []
    for i, r in enumerate(records, 1):
        body = {"requests": [{"prompt": r["prompt"], "target": r["target_new"], "subject": r["subject"]}]}
        if args.method:
            body["method"] = args.method
        t0 = time.perf_counter()
        resp = http.post("/edit", json=body)
        ms = (time.perf_counter() - t0) * 1000
        if resp.status_code == 200:
            out = resp.json()
            res = out["results"][0]
            accepted.append(r)
            log.info("edit %2d v%-3d %-5s p %.2f -> %.2f  %5.0f ms  %s -> %s", i, out["version"],
                     "ok" if res["success"] else "weak", res["p_target_before"], res["p_target_after"], ms,
                     r["prompt"], r["target_new"])
        else:
            log.info("edit %2d refused %d: %s", i, resp.status_code, resp.json().get("detail"))
    said = _ask(http, [r["prompt"] for r in accepted], 6)
    after = _ask(http, [r["locality_prompt"] for r in records], 4)
    log.info("after %d accepted corrections, the model says (neighbour: another subject, same relation):",
             len(accepted))
    holds = kept = 0
    for r, s in zip(accepted, said, strict=True):
        ok = s.strip().startswith(r["target_new"])
        holds += ok
        i = records.index(r)
        same = before[i] == after[i]
        kept += same
        log.info("  %-3s %s%s | neighbour %s: %s%s", "yes" if ok else "no", r["prompt"], _one_line(s),
                 "unchanged" if same else "CHANGED", r["locality_prompt"], _one_line(after[i]))
    log.info("%d of %d corrections hold (the greedy answer starts with the new target); %d of %d neighbours "
             "answer as before the edits; version %s", holds, len(accepted), kept, len(accepted),
             http.get("/health/ready").json()["version"])
    return 0


def _ask(http: httpx.Client, prompts: list[str], tokens: int) -> list[str]:
    out: list[str] = []
    for start in range(0, len(prompts), 8):
        body = {"prompts": prompts[start:start + 8], "max_new_tokens": tokens}
        out += [x["completion"] for x in http.post("/query", json=body).json()["results"]]
    return out


def _one_line(text: str) -> str:
    return text.replace("\n", " ").rstrip()


if __name__ == "__main__":
    raise SystemExit(main())
