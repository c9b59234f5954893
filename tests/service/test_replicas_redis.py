"""MEND_REDIS_URL beyond plain TCP, against real servers: a Redis Sentinel (the bundled redis-server in
sentinel mode) monitoring a real master, where a writer and a replica both find the master through
redis-py's Sentinel client and the replica follows the writer; and rediss:// through a TLS terminator
(Python's ssl, a throwaway CA from the openssl CLI) in front of a real redis-server, which has no TLS
of its own in this build."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
import redis
from mend_harness import edit, fixture_facts, make_settings, serving

from service.redis_conn import connect
from service.redis_embedded import EmbeddedRedis, free_port, redis_server_binary

pytestmark = pytest.mark.integration


@pytest.fixture
def sentinel_url(tmp_path):
    with EmbeddedRedis(tmp_path / "master") as master:
        port = master.url.rsplit(":", 1)[1].split("/")[0]
        sport = free_port()
        conf = tmp_path / "sentinel.conf"  # sentinel rewrites its config file: it must be its own
        conf.write_text(f"port {sport}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {port} 1\n"
                        "sentinel down-after-milliseconds mymaster 5000\n")
        proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            probe = redis.Redis(host="127.0.0.1", port=sport, socket_timeout=2)
            deadline = time.monotonic() + 20
            while True:
                try:
                    if probe.sentinel_get_master_addr_by_name("mymaster"):
                        break
                except redis.RedisError:
                    pass
                assert time.monotonic() < deadline, "sentinel did not come up"
                time.sleep(0.1)
            yield f"redis+sentinel://127.0.0.1:{sport}/mymaster/0", int(port)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_writer_and_replica_find_the_master_through_sentinel(sentinel_url, tiny_tokenizer):
    url, master_port = sentinel_url
    client = connect(url)
    client.set("probe", "1")
    assert client.get("probe") == b"1"
    assert client.connection_pool.get_master_address()[1] == master_port
    facts = fixture_facts()
    writer = make_settings(redis_url=url, role="writer")
    with serving(writer, tiny_tokenizer) as w, serving(writer.model_copy(update={"role": "replica"}),
                                                       tiny_tokenizer) as r:
        done = edit(w, facts[0]["prompt"], facts[0]["target_new"])
        got = r.post("/query", json={"prompts": [facts[0]["prompt"]], "min_version": done["version"]})
        assert got.status_code == 200 and got.json()["version"] == done["version"]
        assert r.get("/health/ready").json()["sha256"] == w.get("/health/ready").json()["sha256"]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def tls_url(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with EmbeddedRedis(tmp_path / "redis") as server:
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    raw, _ = listener.accept()
                except OSError:
                    continue
                try:
                    tls = ctx.wrap_socket(raw, server_side=True)
                except (OSError, ssl.SSLError):
                    raw.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", port))
                for a, b in ((tls, upstream), (upstream, tls)):
                    threading.Thread(target=_pump, args=(a, b), daemon=True).start()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield f"rediss://127.0.0.1:{listener.getsockname()[1]}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
        finally:
            stop.set()
            thread.join(timeout=5)
            listener.close()


def test_writer_and_replica_over_tls(tls_url, tiny_tokenizer):
    assert connect(tls_url).ping()
    plain = tls_url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_timeout=2).ping()  # the port speaks TLS only
    facts = fixture_facts()
    writer = make_settings(redis_url=tls_url, role="writer")
    with serving(writer, tiny_tokenizer) as w, serving(writer.model_copy(update={"role": "replica"}),
                                                       tiny_tokenizer) as r:
        done = edit(w, facts[1]["prompt"], facts[1]["target_new"])
        got = r.post("/query", json={"prompts": [facts[1]["prompt"]], "min_version": done["version"]})
        assert got.status_code == 200 and got.json()["version"] == done["version"]
