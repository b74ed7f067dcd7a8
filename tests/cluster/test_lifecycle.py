"""Stopping the server (issue 14): SIGTERM while it is still starting (Ray up, the model loading)
stops it cleanly too — exit 0, its Ray cluster and workers gone."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .conftest import FIXTURES, STOP_TIMEOUT_S, Service, leftovers


def test_sigterm_while_starting_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    serve = ["serve", "--port", "0", "--model", str(FIXTURES / "llama")]
    command = [sys.executable, "-m", "statemesh.cluster.cli", *serve]
    with open(log, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    time.sleep(4.0)  # Ray is starting, or the workers are
    assert process.poll() is None, log.read_text()
    process.send_signal(signal.SIGTERM)
    assert process.wait(STOP_TIMEOUT_S) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert leftovers(Service(process, "", log)) == []


def test_a_port_that_is_taken_is_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "server.log"
        serve = ["serve", "--port", "0", "--http-port", str(port), "--model", str(FIXTURES / "llama")]
        with open(log, "w") as err:
            process = subprocess.Popen([sys.executable, "-m", "statemesh.cluster.cli", *serve], stdout=subprocess.PIPE,
                                       stderr=err, text=True, start_new_session=True)  # fmt: skip
        assert process.wait(STOP_TIMEOUT_S + 60) == 1, log.read_text()[-3000:]
    text = log.read_text()
    assert f"--http-port: cannot listen on 127.0.0.1:{port}" in text and "Traceback" not in text, text[-3000:]
    assert leftovers(Service(process, "", log)) == []
