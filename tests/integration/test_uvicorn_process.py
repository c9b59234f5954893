"""`mend serve` as a real process: uvicorn, embedded redis-server, model loaded from a local directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from mend_harness import make_tiny_llama  # noqa: E402

from service.redis_embedded import free_port  # noqa: E402

pytestmark = pytest.mark.integration
MEND = Path(sys.executable).parent / "mend"


def _wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mend serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(f"{base}/health/ready", timeout=2)
            if r.status_code == 200:
                return r.json()
            if r.json().get("status") == "failed":
                raise AssertionError(r.text)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready in {timeout_s}s:\n{log.read_text()[-3000:]}")


def test_mend_serve_process_end_to_end(tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEND_")}
    env.update(MEND_MODEL=str(model_dir), MEND_PORT=str(port), MEND_HOST="0.0.0.0",
               MEND_DATA_DIR=str(tmp_path / "var"), MEND_TORCH_THREADS="1", MEND_LOG_FORMAT="json",
               MEND_EDITORS_DIR=str(tmp_path / "no-editors"), MEND_CANARY_GUARD="false")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(MEND), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = _wait_ready(base, proc, log)
        assert ready["version"] == 0 and ready["methods"] == ["ft"] and ready["default_method"] == "ft"
        body = {"requests": [{"prompt": "The capital of Norway is", "target": "Bergen"}]}
        refused = httpx.post(f"{base}/edit", json=body | {"method": "mend"}, timeout=30)
        assert refused.status_code == 409 and "no trained MEND editor" in refused.json()["detail"]
        edited = httpx.post(f"{base}/edit", json=body, timeout=120)  # no method: the default the model offers
        assert edited.status_code == 200 and edited.json()["version"] == 1 and edited.json()["method"] == "ft"
        q = httpx.post(f"{base}/query", json={"prompts": ["The capital of Norway is"], "max_new_tokens": 3},
                       timeout=30)
        assert q.status_code == 200 and q.json()["version"] == 1
        rb = httpx.post(f"{base}/rollback", json={"edit_id": edited.json()["edit_id"]}, timeout=30)
        assert rb.status_code == 200 and rb.json()["version"] == 2
        assert 'mend_edits_applied_total{method="ft"} 1.0' in httpx.get(f"{base}/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful shutdown
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    msgs = [x["msg"] for x in lines]
    assert any("binding 127.0.0.1 instead of 0.0.0.0" in m for m in msgs)  # no keys -> local only
    assert "writer lock released" in msgs and "embedded redis-server stopped" in msgs
    redis_port = next(x["port"] for x in lines if x["msg"] == "starting embedded redis-server")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()
    assert (tmp_path / "var" / "journal.aof").exists()
