"""The scaled-out deployment, checked by parsing (no docker engine here): docker-compose.yml runs one
writer and scalable replicas behind nginx, and docker/nginx.conf sends every route of the app where it
belongs (writes to the writer, everything else to the replicas) with timeouts and limits that fit the
service's settings."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from service.main import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
WRITES = {("POST", "/edit"), ("POST", "/rollback")}


def parse_nginx(text: str) -> list:
    """nginx config as nested lists: a directive is (name, args); a block is (name, args, children)."""
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};"]+', re.sub(r"#[^\n]*", "", text))
    stack: list[list] = [[]]
    words: list[str] = []
    for tok in tokens:
        if tok == ";":
            stack[-1].append((words[0], words[1:]))
            words = []
        elif tok == "{":
            block: list = []
            stack[-1].append((words[0], words[1:], block))
            stack.append(block)
            words = []
        elif tok == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(tok.strip('"'))
    assert len(stack) == 1 and not words, "unbalanced braces"
    return stack[0]


def _blocks(items: list, name: str) -> list[tuple]:
    return [i for i in items if len(i) == 3 and i[0] == name]


def _directive(items: list, name: str) -> list[str] | None:
    found = [i[1] for i in items if len(i) == 2 and i[0] == name]
    return found[0] if found else None


def _location_for(server: list, path: str) -> tuple:
    """nginx's choice: an exact (=) match, else the longest prefix match."""
    locations = _blocks(server, "location")
    for loc in locations:
        if loc[1][0] == "=" and loc[1][1] == path:
            return loc
    prefixes = [loc for loc in locations if len(loc[1]) == 1 and path.startswith(loc[1][0])]
    assert prefixes, f"no location serves {path}"
    return max(prefixes, key=lambda loc: len(loc[1][0]))


def _conf():
    top = parse_nginx((REPO / "docker" / "nginx.conf").read_text())
    upstreams = {u[1][0]: u[2] for u in _blocks(top, "upstream")}
    (server,) = [s[2] for s in _blocks(top, "server")]
    return top, upstreams, server


def _routes(routes):
    """(method, path) of every route, through included routers."""
    for r in routes:
        if hasattr(r, "original_router"):
            yield from _routes(r.original_router.routes)
        elif hasattr(r, "methods") and hasattr(r, "path"):
            yield from ((m, r.path) for m in r.methods)


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_runs_one_writer_and_scalable_replicas_behind_nginx():
    services = _compose()["services"]
    writer, replica, proxy = services["mend"], services["replica"], services["proxy"]
    assert writer["environment"]["MEND_ROLE"] == "writer"
    assert writer["environment"]["MEND_ADVERTISE_URL"] == "http://mend:8000"
    assert replica["environment"]["MEND_ROLE"] == "replica"
    for svc in (writer, replica):  # same image, same Redis, same keys, healthchecked on readiness
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert svc["environment"]["MEND_REDIS_URL"] == "redis://redis:6379/0"
        assert "MEND_API_KEYS" in svc["environment"] and svc["environment"]["MEND_PORT"] == "8000"
        assert "/health/ready" in " ".join(svc["healthcheck"]["test"])
    # --scale replica=N needs no fixed host port and no container name on the replicas
    assert "ports" not in replica and "container_name" not in replica and "ports" not in writer
    name, _, tag = proxy["image"].partition(":")
    assert name == "nginx" and tuple(int(x) for x in re.findall(r"\d+", tag)[:2]) >= (1, 28)  # resolve: >= 1.27.3
    assert "./docker/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in proxy["volumes"]
    assert proxy["ports"] == ["8000:8000"] and set(proxy["depends_on"]) == {"mend", "replica"}


def test_nginx_routes_every_write_to_the_writer_and_every_read_to_the_replicas():
    top, upstreams, server = _conf()
    assert _directive(top, "resolver")[0] == "127.0.0.11"  # Docker's DNS, re-resolved: scaling needs no reload
    writer_servers = [d[1] for d in upstreams["mend_writer"] if d[0] == "server"]
    replica_servers = [d[1] for d in upstreams["mend_replicas"] if d[0] == "server"]
    assert writer_servers == [["mend:8000", "resolve"]]
    assert ["replica:8000", "resolve"] in replica_servers and ["mend:8000", "resolve", "backup"] in replica_servers
    assert all(_directive(u, "zone") for u in upstreams.values())  # "resolve" needs a shared zone
    app = create_app(Settings(redis_url="redis://unused:1/0"))  # built, never started
    routes = {(m, p) for m, p in _routes(app.routes) if m != "HEAD"}
    assert WRITES <= routes and ("POST", "/query") in routes and ("GET", "/events") in routes
    for method, path in routes:
        concrete = re.sub(r"{[^}]+}", "x", path)
        upstream = _directive(_location_for(server, concrete)[2], "proxy_pass")[0]
        want = "http://mend_writer" if (method, path) in WRITES else "http://mend_replicas"
        assert upstream == want, (method, path, upstream)


def test_nginx_limits_and_timeouts_fit_the_service_settings():
    _, _, server = _conf()
    s = Settings()
    size = _directive(server, "client_max_body_size")[0]
    assert int(size.rstrip("k")) * 1024 >= s.max_body_bytes
    edit = _location_for(server, "/edit")[2]
    assert _directive(edit, "proxy_next_upstream") == ["off"]  # a write is never re-sent by the proxy
    assert int(_directive(edit, "proxy_read_timeout")[0].rstrip("s")) > s.edit_timeout_s
    query = _location_for(server, "/query")[2]
    retry_on = _directive(query, "proxy_next_upstream")
    assert {"http_503", "error", "non_idempotent"} <= set(retry_on)  # a lagging replica -> the next one
    assert int(_directive(query, "proxy_read_timeout")[0].rstrip("s")) > s.query_timeout_s + s.min_version_wait_s
    events = _location_for(server, "/events")[2]
    assert _directive(events, "proxy_buffering") == ["off"]
    assert int(_directive(events, "proxy_read_timeout")[0].rstrip("s")) > 300  # the longest max_s
    assert _directive(server, "proxy_http_version") == ["1.1"]
