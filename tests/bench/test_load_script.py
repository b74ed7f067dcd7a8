"""bench/load.py --quick (issue 15): the load script runs against a real server of the llama fixture
and says what it promises. Requests completed, were cancelled, ran in sessions and were refused and
retried; the only errors are the expected ones; every pooled request's tokens matched the in-process
engine's; and nothing leaked (idle server, no session left, memory and RSS back where they were)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

LOAD = Path(__file__).resolve().parents[2] / "bench" / "load.py"
RUN_TIMEOUT_S = 240  # the quick run takes ~1 minute here, most of it the server's start
STOP_TIMEOUT_S = 90  # after SIGTERM, the script stops its server (bench/service.py: up to 60 s, then reaps)
EXPECTED_ERRORS = {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
FIELDS = (
    "clients", "seconds", "requests_ok", "errors_by_code", "cancelled", "session_turns", "tokens_per_s",
    "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "peak_rss_mb_by_process", "rss_after_vs_start",
    "memory_in_use_after_vs_start", "rss_after_vs_peak_before", "correct", "correctness", "cpu", "openblas_core",
    "leak_suspect", "leaked",
)  # fmt: skip
pytestmark = pytest.mark.timeout(RUN_TIMEOUT_S + STOP_TIMEOUT_S + 30)  # the first test runs the script


@pytest.fixture(scope="module")
def quick_run() -> tuple[int, list[dict[str, Any]], str]:
    """(exit status, JSON lines, stderr) of one quick run. A run that overstays is sent SIGTERM, on
    which the script stops its server, so no server outlives the test."""
    process = subprocess.Popen([sys.executable, str(LOAD), "--quick"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=STOP_TIMEOUT_S)
        finally:
            process.kill()
        pytest.fail(f"bench/load.py --quick ran past {RUN_TIMEOUT_S} s; its stderr:\n{err[-4000:]}")
    return process.returncode, [json.loads(line) for line in out.splitlines()], err


@pytest.fixture(scope="module")
def load_lines(quick_run: tuple[int, list[dict[str, Any]], str]) -> list[dict[str, Any]]:
    return [line for line in quick_run[1] if line["bench"] == "load"]


def test_quick_run_exits_zero_with_one_line_per_client_count(quick_run: tuple[int, list[dict[str, Any]], str],
                                                            load_lines: list[dict[str, Any]]) -> None:  # fmt: skip
    code, lines, err = quick_run
    assert code == 0, f"exit status {code}; stderr:\n{err[-4000:]}\nlines: {[line['bench'] for line in lines]}"
    assert [line["clients"] for line in load_lines] == [4, 8]
    for line in load_lines:
        missing = [name for name in FIELDS if name not in line]
        assert not missing, f"fields missing from the {line['clients']}-client line: {missing}"
        assert line["openblas_core"] and line["cpu"]
    stop = next(line for line in lines if line["bench"] == "service_stop")
    assert stop["exit_code"] == 0 and not stop["leftover_pids_killed"]


def test_requests_completed_were_cancelled_and_ran_in_sessions(load_lines: list[dict[str, Any]]) -> None:
    for line in load_lines:
        assert line["requests_ok"] > 0 and line["tokens_per_s"] > 0
        assert 0 < line["ttft_p50_s"] <= line["ttft_p99_s"] and 0 < line["itl_p50_s"] <= line["itl_p99_s"]
    # a few seconds each: the mix's 10% cancels and 20% conversations show up over both runs together
    assert sum(line["cancelled"] for line in load_lines) > 0
    assert sum(line["session_turns"] for line in load_lines) > 0
    assert all(line["sessions_deleted"] >= line["sessions_created"] for line in load_lines)


def test_only_expected_errors_and_refusals_are_waited_out(load_lines: list[dict[str, Any]]) -> None:
    for line in load_lines:
        assert set(line["errors_by_code"]) <= EXPECTED_ERRORS, line["errors_by_code"]
        assert line["errors_unexpected"] == 0, line["unexpected_examples"]
        assert line["errors_by_code"].get("RESOURCE_EXHAUSTED", 0) == line["resource_exhausted_retries"]
    # 8 clients against --max-in-flight 6: some requests are refused, each with a retry-after-ms hint
    eight = load_lines[1]
    assert eight["resource_exhausted_retries"] > 0
    assert eight["retry_after_ms"] and all(ms > 0 for ms in eight["retry_after_ms"])


def test_every_checked_request_matches_the_in_process_engine(load_lines: list[dict[str, Any]]) -> None:
    for line in load_lines:
        assert line["correct"] is True and line["warm_correct"] is True, line["correctness"]
        assert line["correctness"]["wrong"] == 0
    assert sum(line["correctness"].get("pooled_completed_checked", 0) for line in load_lines) > 0


def test_nothing_leaked(load_lines: list[dict[str, Any]]) -> None:
    for line in load_lines:
        assert line["idle_after"] and line["sessions_left"] == 0 and line["sessions_left_at_start"] == 0
        assert line["leak_suspect"] == [] and line["memory_grew"] == [] and line["leaked"] is False
        assert {"coordinator", "r0/s0"} <= set(line["peak_rss_mb_by_process"])
        assert {"coordinator", "r0/s0"} <= set(line["rss_after_vs_start"])
        session_store = line["memory_in_use_after_vs_start"]["r0/s0/session_store"]
        assert session_store["after"] == session_store["start"]
