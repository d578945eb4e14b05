"""callstream.metrics and callstream.health: EMF lines, Prometheus text, the HTTP endpoints."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import pytest

from callstream.health import HealthServer
from callstream.metrics import (
    CHUNKS,
    ITERATOR_AGE_MS,
    SEGMENTS,
    Metrics,
    default_mode,
    start_observability,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_prometheus_text_has_counters_with_total_and_labelled_gauges() -> None:
    metrics = Metrics("transcriber")
    metrics.count(SEGMENTS, kind="final")
    metrics.count(SEGMENTS, 2, kind="final")
    metrics.gauge(ITERATOR_AGE_MS, 1250, shard="shardId-000000000001")
    text = metrics.prometheus()
    assert "# TYPE callstream_transcript_segments_total counter" in text
    assert 'callstream_transcript_segments_total{service="transcriber",kind="final"} 3' in text
    assert "# TYPE callstream_iterator_age_ms gauge" in text
    assert (
        'callstream_iterator_age_ms{service="transcriber",shard="shardId-000000000001"} 1250'
        in text
    )


def test_emf_lines_carry_increases_since_the_last_flush_and_rates() -> None:
    clock, out = Clock(), io.StringIO()
    metrics = Metrics("ingest", "emf", out=out, clock=clock)
    metrics.count(CHUNKS, 120)
    clock.now += 60
    metrics.flush()
    metrics.count(CHUNKS, 30)
    clock.now += 10
    metrics.flush()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["audio_chunks"] == 120 and first["audio_chunks_per_second"] == 2.0
    assert second["audio_chunks"] == 30 and second["audio_chunks_per_second"] == 3.0
    directive = first["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "callstream"
    assert directive["Dimensions"] == [["Service"]]
    assert first["Service"] == "ingest" and first["_aws"]["Timestamp"] == 1_060_000
    assert {"Name": "audio_chunks", "Unit": "Count"} in directive["Metrics"]


def test_emf_gauges_are_grouped_by_their_labels_as_dimensions() -> None:
    metrics = Metrics("recorder", "emf", clock=Clock())
    metrics.gauge(ITERATOR_AGE_MS, 5, shard="a")
    (line,) = [json.loads(x) for x in metrics.emf_lines()]
    assert line["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Service", "shard"]]
    assert line["shard"] == "a" and line[ITERATOR_AGE_MS] == 5
    assert line["_aws"]["CloudWatchMetrics"][0]["Metrics"] == [
        {"Name": ITERATOR_AGE_MS, "Unit": "Milliseconds"}
    ]


def test_mode_is_emf_on_ecs_prometheus_elsewhere_and_can_be_forced() -> None:
    assert default_mode({"ECS_CONTAINER_METADATA_URI_V4": "http://x"}) == "emf"
    assert default_mode({}) == "prometheus"
    assert default_mode({"CALLSTREAM_METRICS": "off"}) == "off"
    with pytest.raises(ValueError, match="CALLSTREAM_METRICS"):
        default_mode({"CALLSTREAM_METRICS": "statsd"})


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_server_answers_liveness_readiness_and_metrics() -> None:
    ready = {"now": False}
    metrics = Metrics("persister")
    metrics.count("rows_written", 4)
    server = HealthServer(metrics, 0, lambda: ready["now"]).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(base + "/healthz") == (200, "ok\n")
        assert _get(base + "/readyz")[0] == 503
        ready["now"] = True
        assert _get(base + "/readyz")[0] == 200
        status, text = _get(base + "/metrics")
        assert status == 200 and 'callstream_rows_written_total{service="persister"} 4' in text
        assert _get(base + "/nope")[0] == 404
    finally:
        server.stop()


def test_start_observability_is_one_call_for_metrics_and_health() -> None:
    metrics = start_observability("ingest", port=0, environ={"CALLSTREAM_METRICS": "prometheus"})
    try:
        assert metrics.health is not None and metrics.flusher is None
        metrics.count(CHUNKS, 7)
        status, text = _get(f"http://127.0.0.1:{metrics.health.port}/metrics")
        assert status == 200 and "callstream_audio_chunks_total" in text
    finally:
        metrics.stop()


def test_start_observability_on_aws_flushes_emf_on_stop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"CALLSTREAM_METRICS": "emf", "CALLSTREAM_METRICS_INTERVAL_S": "3600"}
    metrics = start_observability("recorder", environ=env)
    metrics.count("recordings_uploaded", 2)
    metrics.stop()
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["recordings_uploaded"] == 2 and line["Service"] == "recorder"
