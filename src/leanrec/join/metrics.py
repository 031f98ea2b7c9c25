"""A joiner's counters in the Prometheus text format, read from its JoinStats at scrape time.

``leanrec join --metrics-port N`` serves them on ``/metrics`` while the worker runs; a process that
runs a joiner beside other work registers :class:`JoinCollector` in its own registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from leanrec.join.deadletter import DeadKind
from leanrec.join.joiner import LabelJoiner


class JoinCollector:
    """Exposes a joiner's own counters (no double bookkeeping)."""

    def __init__(self, joiner: LabelJoiner) -> None:
        self.joiner = joiner

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The counters now (called at every scrape)."""
        js = self.joiner.stats
        for name, value, doc in (
            ("leanrec_join_requests_joined", js.requests_joined, "Requests joined"),
            ("leanrec_join_examples", js.examples, "Examples written to the warehouse"),
            ("leanrec_join_labels_lost", js.labels_lost, "Viewed items whose frozen features were gone"),
            ("leanrec_join_recovered_committed", js.recovered_committed, "Taken over, already committed"),
            ("leanrec_join_outages", js.outages, "Times Redis stopped answering; the worker waited"),
        ):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], value)
            yield m
        by_kind = dict(js.dead_letters_by_kind)  # a copy: the joiner's thread may add a kind meanwhile
        d = CounterMetricFamily(
            "leanrec_join_dead_letters",
            "Records set aside because they cannot be read, by kind",
            labels=["kind"],
        )
        for kind in DeadKind:  # every kind from the start, so a rate over it has no gap
            d.add_metric([kind.value], by_kind.get(kind.value, 0))
        yield d
        g = GaugeMetricFamily("leanrec_join_open_requests", "Requests waiting for their window to close")
        g.add_metric([], self.joiner.open_requests)
        yield g


def serve_metrics(joiner: LabelJoiner, host: str, port: int) -> WSGIServer:
    """Serve the joiner's counters on ``http://host:port/metrics`` from a daemon thread.

    Returns:
        The server (``server_address`` says the port when 0 was asked); ``shutdown()`` stops it.

    Raises:
        OSError: The address cannot be bound.

    """
    registry = CollectorRegistry()
    registry.register(JoinCollector(joiner))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
