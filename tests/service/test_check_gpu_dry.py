"""`mend check-gpu --dry`: the GPU check's own code path on CPU with a tiny llama (model directory,
untrained MEND editor and key statistics made for it), through the real service and journal, so that
it cannot rot. And without --dry, no CUDA means exit status 2 with a message saying what to do."""

from __future__ import annotations

import json

import pytest
import torch

from service.cli import main


def run_dry(tmp_path, dtype: str) -> tuple[int, dict, str]:
    out, raw = tmp_path / "GPU.md", tmp_path / "result.json"
    rc = main(["check-gpu", "--dry", "--dtypes", dtype, "--out", str(out), "--json", str(raw)])
    return rc, json.loads(raw.read_text()), out.read_text()


def checks_of(result: dict) -> dict[str, bool]:
    return {c["name"]: c["passed"] for c in result["checks"]}


def test_dry_run_fp32_passes_every_check_and_reports(tmp_path, capsys):
    rc, result, md = run_dry(tmp_path, "float32")
    checks = checks_of(result)
    assert rc == 0 and all(checks.values()), checks
    assert {"float32: rolling back every edit restores the weights bit for bit",
            "float32: journal replay after a restart reproduces the sha256",
            "float32: 50 active edits applied, queried and reset"} <= set(checks)
    assert any(name.startswith("fp32: CPU and cpu agree") for name in checks)
    fig = result["figures"]["float32"]
    assert fig["methods"] == ["mend", "alphaedit"] and fig["alphaedit"]["success"] >= 0.75
    assert fig["alphaedit"]["latency_p50_ms"] > 0 and fig["fwd_bwd_ms"] > 0
    assert [q["batch"] for q in fig["query"]] == [1, 16] and all(q["prompts_per_s"] > 0 for q in fig["query"])
    assert fig["memory"]["50"]["active"] == 50 and fig["memory"]["0"]["peak_gib"] is None  # no GPU here
    table = capsys.readouterr().out
    assert "alphaedit: edit latency p50 / p95 (ms, server)" in table and "FAIL" not in table
    assert "not a GPU" in md and f"{len(checks)} of {len(checks)} checks passed" in md


def test_dry_run_bf16_rollback_and_replay_exact(tmp_path):
    rc, result, _ = run_dry(tmp_path, "bfloat16")
    checks = checks_of(result)
    for name in ("rolling back every edit restores the weights bit for bit",
                 "journal replay after a restart reproduces the sha256",
                 "rolling back the replayed edits restores the weights bit for bit",
                 "50 active edits applied, queried and reset"):
        assert checks[f"bfloat16: {name}"], name
    # the MEND editor and key statistics were made on the fp32 weights: the bf16-rounded fingerprint
    # they carry matches the model loaded in bf16, so both methods are offered there too
    assert checks["bfloat16: mend, alphaedit offered"]
    assert rc == 0 and all(checks.values()), checks


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_real_check_exits_2(tmp_path, caplog):
    assert main(["check-gpu", "--out", str(tmp_path / "GPU.md")]) == 2
    assert "no CUDA device" in caplog.text and "--dry" in caplog.text
    assert not (tmp_path / "GPU.md").exists()
