"""Prometheus instruments of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Request counts and latency per route, edit counters, journal version, batch sizes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mend_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "mend_http_request_duration_seconds", "HTTP request latency", ["route", "method"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.edits_applied = Counter("mend_edits_applied", "Edits applied and journaled", ["method"], registry=r)
        self.edits_rolled_back = Counter("mend_edits_rolled_back", "Edits rolled back", registry=r)
        self.edit_seconds = Histogram(
            "mend_edit_duration_seconds", "Compute + apply + journal time of one edit", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.journal_version = Gauge("mend_journal_version", "Journal version of the live weights", registry=r)
        self.active_edits = Gauge("mend_active_edits", "Edits currently applied", registry=r)
        self.canary_changed = Gauge("mend_canary_changed", "Canary prompts answering differently from the unedited "
                                    "model, with the last checked candidate edit applied", registry=r)
        self.batch_size = Histogram(
            "mend_query_batch_size", "Prompts per query micro-batch", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.ready = Gauge("mend_ready", "1 once the model is loaded and the journal replayed", registry=r)
        # roles and replicas (service.replica): a writer reports lag 0 and its own version as the head
        self.writer = Gauge("mend_writer", "1 while this instance is the journal's writer, 0 as a replica",
                            registry=r)
        self.journal_head_version = Gauge("mend_journal_head_version", "Version of the journal's head in Redis, "
                                          "as last seen by this instance", registry=r)
        self.replica_lag_ops = Gauge("mend_replica_lag_ops", "Ops in the journal not yet applied here", registry=r)
        self.replica_lag_seconds = Gauge("mend_replica_lag_seconds", "Seconds this replica has been behind the "
                                         "journal head (or out of touch with Redis)", registry=r)
        self.replica_ops_applied = Counter("mend_replica_ops_applied", "Journal ops applied by following the "
                                           "stream (each checked against its recorded sha256)", registry=r)
