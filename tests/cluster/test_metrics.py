"""Prometheus metrics (issue 16): `statemesh serve --metrics-port 0` serves /metrics; after real
traffic through the public API (plain completions, a prefix-cache hit, a session's two turns, a
request migrated mid-stream) a scrape's numbers are the ones that traffic implies. Plus the two
pieces of arithmetic behind them, checked alone: inter-token gaps as a client sees them, and engine
totals that never go back when an engine restarts."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from statemesh.cluster import Client
from statemesh.cluster.metrics import Metrics, RequestTimer

from .conftest import FIXTURES, Service, leftovers, start_service

GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
SCRAPE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer, parsed by prometheus_client's own text parser."""

    samples: list[tuple[str, dict[str, str], float]]  # (sample name, labels, value)

    def total(self, name: str, **labels: str) -> float:
        """The sum over the series of `name` whose labels include `labels`."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def series(self, name: str) -> list[dict[str, str]]:
        return [ls for n, ls, _ in self.samples if n == name]


def scrape(address: str, path: str = "/metrics") -> Scrape:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=SCRAPE_TIMEOUT_S) as answer:
        text = answer.read().decode()
    families = text_string_to_metric_families(text)
    return Scrape([(s.name, s.labels, s.value) for f in families for s in f.samples])


@pytest.fixture(scope="module")
def metrics_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Two replicas of the tiny seeded Llama fixture, metrics on a free port."""
    args = ["--model", str(FIXTURES / "llama"), "--replicas", "2", "--n-ctx", "512", "--max-seqs", "8"]
    service = start_service([*args, "--metrics-port", "0"], tmp_path_factory.mktemp("metrics_service") / "server.log")
    yield service
    assert service.stop() == 0
    assert leftovers(service, service.worker_pids) == [], "the server left processes running"


def prompt(length: int, salt: int) -> list[int]:
    return [(7 * salt + 3 * k) % 300 + 20 for k in range(length)]


def test_a_scrape_after_real_traffic_counts_what_was_sent(metrics_service: Service) -> None:
    metrics_address = metrics_service.also_listening["metrics"]
    assert metrics_address.startswith("127.0.0.1:")
    before = scrape(metrics_address)  # nothing sent yet: every count is zero, and the replicas are there
    assert before.total("statemesh:prompt_tokens_total") == 0
    assert before.total("statemesh:e2e_request_latency_seconds_count") == 0
    assert {s["replica"] for s in before.series("statemesh:num_requests_running")} == {"r0", "r1"}

    client = Client(metrics_service.address)
    done = [client.complete(prompt(n, n), **GREEDY) for n in (10, 13, 17)]  # plain completions
    assert [d.usage.prompt_tokens for d in done] == [10, 13, 17]
    shared = prompt(40, 1)  # its last full block (32 tokens) is checkpointed in its replica's prefix cache
    done += [client.complete(shared, **GREEDY), client.complete([*shared[:32], *prompt(8, 2)], **GREEDY)]
    assert done[-1].usage.cached_tokens == 32  # routed to the same replica, and a prefix-cache hit
    client.create_session("metered")
    done += [client.complete([30, 31, 32, 33, 34], session_id="metered", **GREEDY)]
    done += [client.complete([40, 41, 42], session_id="metered", **GREEDY)]  # its history is reused
    assert done[-1].usage.cached_tokens > 0
    stream = client.generate(prompt(12, 3), request_id="metered-mover", **{**GREEDY, "max_tokens": 200})
    chunks = [next(stream)]
    moved = client.migrate(request_id="metered-mover")
    chunks += list(stream)
    assert chunks[-1].finish_reason == "length" and chunks[-1].replica_id == moved.target_replica_id

    n_requests = len(done) + 1
    received = sum(len(d.token_ids) for d in done) + sum(len(c.token_ids) for c in chunks)
    after = scrape(metrics_address)
    assert after.total("statemesh:prompt_tokens_total") == sum(d.usage.prompt_tokens for d in done) + 12
    assert after.total("statemesh:generation_tokens_total") == received == 7 * 12 + 200
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert after.total(f"statemesh:{histogram}_count") == n_requests, histogram
    # every token but each request's first is one gap after another
    assert after.total("statemesh:inter_token_latency_seconds_count") == received - n_requests
    # a request's first token and the gaps after it add up to when its last token came: no later than its end
    ttft = after.total("statemesh:time_to_first_token_seconds_sum")
    gaps = after.total("statemesh:inter_token_latency_seconds_sum")
    assert 0 < ttft + gaps <= after.total("statemesh:e2e_request_latency_seconds_sum") + 1e-6

    assert after.total("statemesh:migrations_total") == 1
    assert after.total("statemesh:migration_bytes_total") == moved.state_bytes > 0
    assert after.total("statemesh:migration_pause_seconds_count") == 1
    assert after.total("statemesh:migration_pause_seconds_sum") == pytest.approx(moved.pause_ms / 1000)
    assert after.total("statemesh:recoveries_total") == 0

    # the engines' own counts: every plain prompt was looked up in its replica's prefix cache (a
    # session's turn reuses the session instead); one found a prefix; nothing ran short of memory
    assert after.total("statemesh:prefix_cache_queries_total") == 6
    assert after.total("statemesh:prefix_cache_hits_total") == 1
    assert after.total("statemesh:num_preemptions_total") == 0
    assert after.total("statemesh:num_requests_running") == 0 == after.total("statemesh:num_requests_waiting")

    replicas = client.replicas()
    for replica in replicas:
        for worker in replica.workers:
            shown = {s["component"] for s in after.series("statemesh:memory_bytes") if s["worker"] == worker.worker_id}
            assert shown == set(worker.memory_bytes), worker.worker_id
            labels = {"replica": replica.replica_id, "worker": worker.worker_id}
            assert after.total("statemesh:memory_bytes", **labels, component="kv") > 0
            weights = after.total("statemesh:memory_bytes", **labels, component="weights")
            assert weights == worker.memory_bytes["weights"] > 0
            metrics_service.worker_pids.append(worker.pid)  # to check they end with the server
    assert len(after.series("statemesh:memory_bytes")) == sum(len(w.memory_bytes) for r in replicas for w in r.workers)

    again = scrape(metrics_address)  # nothing sent since: a second scrape counts nothing twice
    for name in ("prefix_cache_queries_total", "prompt_tokens_total", "generation_tokens_total", "migrations_total"):
        assert again.total(f"statemesh:{name}") == after.total(f"statemesh:{name}"), name
    client.delete("metered")
    client.close()


def test_the_metrics_port_serves_only_metrics(metrics_service: Service) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        scrape(metrics_service.also_listening["metrics"], "/elsewhere")
    assert e.value.code == 404


def collected(metrics: Metrics) -> Scrape:
    return Scrape([(s.name, s.labels, s.value) for f in metrics.registry.collect() for s in f.samples])


def test_inter_token_gaps_are_what_a_client_sees() -> None:
    """RequestTimer's worked example: chunks of 3, 2 and 1 tokens at 0.2, 0.5 and 0.6 s after the
    request came -> first token 0.2 s, then gaps 0, 0, 0.15, 0.15, 0.1; the end at 0.7 s."""
    metrics = Metrics()
    times = iter([10.0, 10.2, 10.5, 10.6, 10.7])
    timer = RequestTimer(metrics, clock=lambda: next(times))
    for n in (3, 2, 1):
        timer.tokens(n)
    timer.finished(prompt_tokens=9)
    got = collected(metrics)
    assert got.total("statemesh:time_to_first_token_seconds_count") == 1
    assert got.total("statemesh:time_to_first_token_seconds_sum") == pytest.approx(0.2)
    assert got.total("statemesh:inter_token_latency_seconds_count") == 5
    assert got.total("statemesh:inter_token_latency_seconds_sum") == pytest.approx(0.4)
    assert got.total("statemesh:inter_token_latency_seconds_bucket", le="0.001") == 2  # the two gaps of 0
    assert got.total("statemesh:inter_token_latency_seconds_bucket", le="0.1") == 3
    assert got.total("statemesh:inter_token_latency_seconds_bucket", le="0.2") == 5
    assert got.total("statemesh:e2e_request_latency_seconds_sum") == pytest.approx(0.7)
    assert got.total("statemesh:generation_tokens_total") == 6 and got.total("statemesh:prompt_tokens_total") == 9


def test_engine_totals_never_go_back_when_an_engine_restarts() -> None:
    """r0's engine counts 3, 5, then restarts and counts 2, 4: the counter says 5 + 4."""
    metrics = Metrics()
    for replica, total in [("r0", 3), ("r1", 1), ("r0", 5), ("r0", 2), ("r1", 1), ("r0", 4)]:
        metrics.preemptions.follow(replica, total)
    got = collected(metrics)
    assert got.total("statemesh:num_preemptions_total", replica="r0") == 5 + 4
    assert got.total("statemesh:num_preemptions_total", replica="r1") == 1
