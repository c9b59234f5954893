"""Redis clients for ``MEND_REDIS_URL``: plain, TLS, or through Redis Sentinel.

Accepted URLs:
  ``redis://[user:pass@]host:port/db``        plain TCP
  ``rediss://[user:pass@]host:port/db``       TLS; redis-py's ``ssl_*`` options as query parameters,
                                              e.g. ``?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required``
  ``unix:///path/redis.sock?db=0``            a local socket
  ``redis+sentinel://[user:pass@]h1:26379[,h2:26379...]/<master name>[/db]``
  ``rediss+sentinel://...``                   the same, TLS to the master (and the sentinels)
                                              (optional ``?sentinel_password=...`` for the sentinels)

With Sentinel the client is redis-py's own ``Sentinel(...).master_for(name)``: the master's address is
asked of the sentinels on every new connection, so after a Redis failover the journal, the writer
lock and the followers reconnect to the new master by themselves (a write in flight at that moment
fails with a connection error: a 503, and the client retries with its idempotency key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

import redis
import redis.asyncio as aredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS


class RedisUrlError(ValueError):
    """MEND_REDIS_URL cannot be understood; the message names the part."""


@dataclass(frozen=True)
class SentinelSpec:
    """A parsed ``redis+sentinel://`` URL."""

    hosts: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_password: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def parse_sentinel_url(url: str) -> SentinelSpec | None:
    """The Sentinel spec of ``url``, or None when it is not a sentinel URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SENTINEL_SCHEMES:
        return None
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        hostlist, userinfo = netloc, ""
    username, password = None, None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if colon else None)
    hosts = []
    for item in hostlist.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise RedisUrlError(f"sentinel address {item!r} in MEND_REDIS_URL must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise RedisUrlError("MEND_REDIS_URL redis+sentinel://hosts/<master name>[/db] lacks the master name")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise RedisUrlError(f"MEND_REDIS_URL path {path!r} must be /<master name>[/<db number>]")
    options = dict(parse_qsl(query))
    return SentinelSpec(hosts, unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0, username, password,
                        SENTINEL_SCHEMES[scheme], options.pop("sentinel_password", None), options)


def _sentinel_args(spec: SentinelSpec, kwargs: dict) -> tuple[dict, dict]:
    """(sentinel_kwargs for the sentinels, connection kwargs for the master)."""
    conn = dict(kwargs)
    conn.update({k: v for k, v in spec.options.items()})
    if spec.tls:
        conn["ssl"] = True
    sentinel_kwargs = {k: v for k, v in conn.items() if k.startswith("ssl") or k.startswith("socket")}
    if spec.sentinel_password:
        sentinel_kwargs["password"] = spec.sentinel_password
    master = {"db": spec.db, "username": spec.username, "password": spec.password, **conn}
    return sentinel_kwargs, master


def connect(url: str, **kwargs) -> redis.Redis:
    """A client for ``url`` (see the module docstring); ``kwargs`` go to every connection."""
    spec = parse_sentinel_url(url)
    if spec is None:
        return redis.Redis.from_url(url, **kwargs)
    sentinel_kwargs, master = _sentinel_args(spec, kwargs)
    return Sentinel(spec.hosts, sentinel_kwargs=sentinel_kwargs).master_for(spec.service, **master)


def connect_async(url: str, **kwargs) -> aredis.Redis:
    """The asyncio client for ``url`` (the /events stream)."""
    spec = parse_sentinel_url(url)
    if spec is None:
        return aredis.Redis.from_url(url, **kwargs)
    sentinel_kwargs, master = _sentinel_args(spec, kwargs)
    return AsyncSentinel(spec.hosts, sentinel_kwargs=sentinel_kwargs).master_for(spec.service, **master)


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    spec = parse_sentinel_url(url)
    if spec is not None:
        hosts = ",".join(f"{h}:{p}" for h, p in spec.hosts)
        return f"sentinel {hosts} master {spec.service!r} db {spec.db}{' (tls)' if spec.tls else ''}"
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{host}" if at else url
