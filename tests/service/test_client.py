"""MendClient against real apps (writer + replica, in process, on a real redis-server): safe retries
with idempotency keys when a response is lost, 409 not_writer followed, read-your-writes falling back
to the writer when a replica lags, errors carrying the service's code."""

from __future__ import annotations

import httpx
import pytest
from mend_harness import fixture_facts, make_settings, serving

from service.client import MendClient, MendError

pytestmark = pytest.mark.integration


class LoseFirstResponse(httpx.BaseTransport):
    """Forwards every request to the app but drops the first response of each path in ``paths``
    (the request lands, the caller sees a timeout): what a retry must survive."""

    def __init__(self, inner: httpx.BaseTransport, paths: set[str]):
        self.inner = inner
        self.pending = set(paths)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        inner = self.inner.handle_request(request)
        response = httpx.Response(inner.status_code, headers=inner.headers, content=inner.read())
        if request.url.path in self.pending:
            self.pending.discard(request.url.path)
            raise httpx.ReadTimeout("response lost", request=request)
        return response


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    writer = make_settings(role="writer", advertise_url="http://writer")
    replica = writer.model_copy(update={"role": "replica", "min_version_wait_s": 0.2})
    with serving(writer, tiny_tokenizer) as w, serving(replica, tiny_tokenizer) as r:
        yield w, r


def _client(pair, writer="http://writer", lose: set[str] = frozenset(), **kw) -> MendClient:
    w, r = pair
    http = httpx.Client(mounts={"http://writer": LoseFirstResponse(w._transport, set(lose)),
                                "http://replica": LoseFirstResponse(r._transport, set())})
    return MendClient(writer, replicas=["http://replica"], http=http, backoff_s=0.01, **kw)


def _req(i: int) -> dict:
    f = fixture_facts()[i]
    return {"prompt": f["prompt"], "target": f["target_new"]}


def test_lost_responses_are_retried_without_a_second_edit_or_rollback(pair):
    w, _ = pair
    with _client(pair, lose={"/edit", "/rollback"}) as mend:
        first = mend.edit([_req(0)], method="ft")
        assert first.idempotent_replay  # the retry got the first attempt's result
        page = mend.edits(limit=10)
        assert [e["edit_id"] for e in page.edits].count(first.edit_id) == 1 and page.total == 1
        rolled = mend.rollback(first.edit_id)  # first attempt landed, retry got 409 already_rolled_back
        assert rolled.edit_id == first.edit_id and rolled.version == first.version + 1
        assert w.get("/health/ready").json()["version"] == rolled.version


def test_a_replica_named_as_writer_sends_the_client_on(pair):
    with _client(pair, writer="http://replica") as mend:
        out = mend.edit([_req(1)], method="ft")
        assert mend.writer == "http://writer" and out.version == mend.last_version


def test_read_your_writes_falls_back_to_the_writer_when_the_replica_lags(pair):
    w, r = pair
    follower = r.app.state.runtime.follower
    with _client(pair) as mend:
        out = mend.edit([_req(2)], method="ft")
        assert mend.query([_req(2)["prompt"]]).version >= out.version
        follower.stop()  # the replica stops following: it stays behind from here on
        later = mend.edit([_req(3)], method="ft")
        got = mend.query([_req(3)["prompt"]])  # the replica says 503 version_not_reached, the writer answers
        assert got.version >= later.version
        assert r.app.state.runtime.engine.version < later.version
        with pytest.raises(MendError) as err:
            mend.query(["hi"], max_new_tokens=10_000)
        assert err.value.status == 422 and "max_new_tokens" in str(err.value.detail)
        with pytest.raises(MendError) as err:
            mend.rollback("no-such-edit")
        assert err.value.status == 404 and err.value.code == "edit_not_found"
