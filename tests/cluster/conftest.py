"""The real service for the cluster tests: `statemesh serve` in a process of its own (its embedded Ray
cluster on loopback, gRPC on 127.0.0.1, port 0), started once per module and stopped with SIGTERM,
which must leave no process behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# a template of our own: the llama fixture has none (its plain copy checks the error for that)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
READY = "statemesh listening on "
# what else listens, announced before the ready line: "statemesh metrics listening on HOST:PORT"
ALSO_LISTENING = re.compile(r"statemesh (\w+) listening on (\S+)$")


@dataclass
class Service:
    process: subprocess.Popen[str]
    address: str
    log: Path
    worker_pids: list[int] = field(default_factory=list)  # filled by tests that list the replicas
    also_listening: dict[str, str] = field(default_factory=dict)  # e.g. "metrics" -> its HOST:PORT

    def stop(self) -> int:
        """SIGTERM, then wait: the server must exit by itself, with status 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # never leave it running
            self.process.wait()
            raise AssertionError(f"the server did not stop within {STOP_TIMEOUT_S} s of SIGTERM") from None


def start_service(args: list[str], log: Path) -> Service:
    """`statemesh serve ARGS --port 0`; returns once it prints its ready line."""
    command = [sys.executable, "-m", "statemesh.cluster.cli", "serve", "--port", "0", *args]
    with open(log, "w") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True, env={**os.environ}
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or []], daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    also_listening: dict[str, str] = {}
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line.startswith(READY):
            return Service(process, line[len(READY) :].strip(), log, also_listening=also_listening)
        other = ALSO_LISTENING.match(line.strip())
        if other:
            also_listening[other[1]] = other[2]
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise AssertionError(f"the server did not become ready; its log:\n{log.read_text()[-4000:]}")


def chat_model(folder: Path) -> Path:
    """The llama fixture with a chat template (CHAT_TEMPLATE) in `folder`, which it makes: its files
    linked, a tokenizer_config.json of its own."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        (folder / name).symlink_to(FIXTURES / "llama" / name)
    config = json.loads((FIXTURES / "llama" / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return folder


def leftovers(service: Service, worker_pids: list[int] = ()) -> list[str]:  # type: ignore[assignment]
    """Processes of a stopped server still alive: its process group (where Ray's own processes run)
    and its workers (each in a group of its own). Ray takes a moment to reap them."""
    deadline = time.monotonic() + 15.0
    while True:
        group = subprocess.run(["pgrep", "-a", "-g", str(service.process.pid)], capture_output=True, text=True)
        alive = group.stdout.splitlines() + [f"worker {pid}" for pid in worker_pids if _alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"  # a zombie has ended


@pytest.fixture(scope="module")
def llama_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Two replicas of the tiny seeded Llama fixture."""
    service = start_service(
        ["--model", str(FIXTURES / "llama"), "--replicas", "2", "--n-ctx", "512", "--max-seqs", "8"],
        tmp_path_factory.mktemp("llama_service") / "server.log",
    )
    yield service
    assert service.stop() == 0
    assert leftovers(service, service.worker_pids) == [], "the server left processes running"
