"""`statemesh batch IN.jsonl OUT.jsonl` (issue 16): offline generation over the cluster's replicas.

Three ways it runs, each checked line by line against the in-process engine: on its own embedded Ray
cluster, against a running server (`--address`), and as a Ray job (`ray job submit -- statemesh batch`)
on a `ray start --head` cluster. One head serves both of the last two (the server joins it), so the
module starts two Ray clusters in all. Resuming, bad input and refused lines are checked too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from statemesh.cluster.batch import SAMPLING_TYPES, BadInput, read_input, resume_output
from statemesh.cluster.client import SAMPLING_FIELDS
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request, TokenEvent
from statemesh.worker.engine.sampling import SamplingParams

from .conftest import FIXTURES, Service, leftovers, start_service
from .conftest import chat_model as chat_model_folder

BIN = Path(sys.executable).parent  # the venv's bin: statemesh, ray
RUN_TIMEOUT_S = 300.0
HEAD_START_TIMEOUT_S = 120.0
JOB_SERVER_TRIES = 10
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
GREEDY = {"max_tokens": 10, "temperature": 0.0}
SEEDED = {"max_tokens": 10, "temperature": 0.8, "top_k": 40, "seed": 7}
# the engines of every run: small, so that the seven lines share a replica's batch
ENGINE_ARGS = ["--n-ctx", "512", "--max-seqs", "4"]


def prompt(i: int) -> list[int]:
    return [(7 * i + 3 * k) % 300 + 20 for k in range(10 + i % 7)]


# IN's lines: every kind of prompt, greedy and seeded, ids given and not (then: the line number)
LINES: list[dict[str, Any]] = [
    {"prompt": "The capital of France is", **GREEDY},
    {"id": "text-seeded", "prompt": "Once upon a time", **SEEDED},
    {"token_ids": prompt(0), **GREEDY},
    {"id": "ids-seeded", "token_ids": prompt(1), **SEEDED, "seed": 11},
    {"messages": MESSAGES, **GREEDY},
    {"id": 42, "messages": MESSAGES, **SEEDED},
    {"token_ids": prompt(2), "max_tokens": 6, "temperature": 0.0, "logprobs": 2},
]


def line_id(number: int) -> str | int:
    return LINES[number - 1].get("id", number)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama fixture with a chat template, so that chat messages run too."""
    return chat_model_folder(tmp_path_factory.mktemp("batch_model") / "llama-chat")


@cache
def reference_model(folder: Path) -> Model:
    return load_model(folder, backend="numpy", progress=False)


def expected_record(model: Model, line: dict[str, Any], number: int) -> dict[str, Any]:
    """The OUT line the in-process engine gives for one IN line, run alone."""
    tokenizer = model.tokenizer
    if "prompt" in line:
        ids = tokenizer.encode(line["prompt"])
    elif "messages" in line:
        ids = tokenizer.encode(tokenizer.apply_chat_template(line["messages"], add_generation_prompt=True))
    else:
        ids = line["token_ids"]
    sampling = {k: v for k, v in line.items() if k in SAMPLING_TYPES}
    engine = Engine(model, EngineConfig(n_ctx=512, n_seq_max=4))
    events = engine.generate([Request("x", tuple(ids), SamplingParams(**sampling))])["x"]
    tokens = [e.token for e in events if e.token >= 0]
    record = {"id": line.get("id", number), "text": "".join(e.text for e in events), "token_ids": tokens,
              "finish_reason": events[-1].finish_reason,
              "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens)}}  # fmt: skip
    if line.get("logprobs") is not None:
        record["logprobs"] = [logprob_record(e) for e in events if e.token >= 0]
    return record


def logprob_record(e: TokenEvent) -> dict[str, Any]:
    top = [{"token_id": t, "logprob": p} for t, p in e.top_logprobs]
    return {"token_id": e.token, "logprob": e.logprob, "top": top}


def assert_same_record(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Equal, but for logprobs, which are compared to float32 precision (a batched step's logits may
    differ from a lone one's in the last bits; the tokens may not)."""
    got, want = dict(got), dict(want)
    got_lp, want_lp = got.pop("logprobs", None), want.pop("logprobs", None)
    assert got == want
    assert (got_lp is None) == (want_lp is None), (got_lp, want_lp)
    for g, w in zip(got_lp or [], want_lp or [], strict=True):
        assert g["token_id"] == w["token_id"] and g["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
        assert [t["token_id"] for t in g["top"]] == [t["token_id"] for t in w["top"]]
        assert [t["logprob"] for t in g["top"]] == pytest.approx([t["logprob"] for t in w["top"]], abs=1e-4)


def assert_every_line_is_the_engines(out: Path, model: Model) -> None:
    records = [json.loads(raw) for raw in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert len(records) == len(LINES) and set(by_id) == {line_id(n) for n in range(1, len(LINES) + 1)}
    for number, line in enumerate(LINES, start=1):
        assert_same_record(by_id[line_id(number)], expected_record(model, line, number))


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def batch_env() -> dict[str, str]:
    """The test's environment without a Ray address: a batch without --ray-address embeds its own."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def run_batch(args: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "statemesh"), "batch", *args], capture_output=True, text=True,
                          timeout=timeout, env=batch_env())  # fmt: skip


SUMMARY = re.compile(
    r"statemesh batch: (\d+) requests \((\d+) errors, (\d+) already in OUT\), (\d+) prompt tokens, (\d+) generated "
    r"tokens in ([\d.]+) s: ([\d.]+) generated tokens/s"
)


def summary(stderr: str) -> tuple[int, int, int, int, int]:
    """(requests, errors, skipped, prompt tokens, generated tokens) from the run's last line."""
    found = SUMMARY.search(stderr)
    assert found is not None, stderr[-3000:]
    return tuple(int(found[i]) for i in range(1, 6))  # type: ignore[return-value]


# ---- input and output, without a cluster -------------------------------------------------------------


def test_every_sampling_field_is_accepted_under_its_name() -> None:
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(SAMPLING_TYPES) == names == set(SAMPLING_FIELDS)


BAD_LINES = [
    ("not json", "not JSON"),
    ("[1, 2]", "a JSON list; expected an object"),
    ('{"max_tokens": 4}', "no prompt; expected exactly one of"),
    ('{"prompt": "a", "token_ids": [1]}', "more than one prompt"),
    ('{"prompt": "a", "temprature": 0.5}', "unknown field(s) ['temprature']"),
    ('{"prompt": "a", "temperature": "hot"}', "temperature must be a number, got 'hot'"),
    ('{"prompt": "a", "top_p": 0}', "top_p must be in (0, 1]"),
    ('{"prompt": "a", "max_tokens": 2.5}', "max_tokens must be an integer, got 2.5"),
    ('{"prompt": "a", "stop": "x"}', "stop must be a list of strings"),
    ('{"prompt": ""}', "prompt must be non-empty text"),
    ('{"token_ids": [1, -2]}', "token_ids must be a non-empty list of token ids"),
    ('{"messages": [{"role": "user"}]}', "messages must be a non-empty list"),
    ('{"id": 1.5, "prompt": "a"}', "id 1.5 must be a string or an integer"),
]


def test_bad_input_lines_are_each_reported_with_their_number(tmp_path: Path) -> None:
    good = '{"id": "same", "prompt": "fine"}'
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([good, *(raw for raw, _ in BAD_LINES), "", good]) + "\n")
    with pytest.raises(BadInput) as caught:
        read_input(path)
    message = str(caught.value)
    for number, (_, says) in enumerate(BAD_LINES, start=2):
        assert f"{path}:{number}: {says}" in message, (number, message)
    repeated = len(BAD_LINES) + 3  # after the bad lines and a blank one, which is skipped but counted
    assert f"{path}:{repeated}: id 'same' is also line 1's; ids must be unique" in message
    assert len(message.splitlines()) == len(BAD_LINES) + 1


def test_good_lines_keep_their_ids_or_take_their_line_numbers(tmp_path: Path) -> None:
    lines = read_input(write_lines(tmp_path / "in.jsonl", LINES))
    assert [line.id for line in lines] == [line_id(n) for n in range(1, len(LINES) + 1)]
    assert lines[1].text == "Once upon a time" and lines[1].params == SamplingParams(**SEEDED)
    assert lines[2].token_ids == tuple(prompt(0))
    assert lines[4].messages == (("system", "Be brief."), ("user", "Hi there"))


def test_the_command_refuses_bad_input_before_starting_anything(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "a", "seed": -1}\n')
    out = tmp_path / "out.jsonl"
    done = run_batch([str(path), str(out), "--model", str(FIXTURES / "llama")], timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{path}:2: seed must be an integer in [0, 2^63), got -1" in done.stderr
    assert not out.exists() and "Ray" not in done.stderr  # refused before OUT was opened or Ray started


def test_resuming_cuts_a_truncated_last_line_and_refuses_a_foreign_out(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    whole = '{"id": 1, "text": "a"}\n{"id": "b", "error": "OUT_OF_RANGE: too long"}\n'
    out.write_text(whole + '{"id": 3, "te')
    done = resume_output(out)
    assert done.ids == {1, "b"} and done.errors == {"b"}
    assert out.read_text() == whole  # what comes next starts a line of its own
    foreign = whole + "some other file\n" + '{"id": 4, "te'
    out.write_text(foreign)
    with pytest.raises(BadInput, match=r"out.jsonl:3 is not a line statemesh batch wrote"):
        resume_output(out)
    assert out.read_text() == foreign  # refused: not even its last line is cut
    assert resume_output(tmp_path / "absent.jsonl").ids == set()


# ---- (a) on an embedded Ray cluster, with the progress bar on a terminal ------------------------------


@dataclass
class OnTerminal:
    returncode: int
    terminal: str  # what the command drew on its stderr, a pseudo-terminal
    group_left: list[str]  # processes of its process group still alive after it exited


def run_on_a_terminal(args: list[str]) -> OnTerminal:
    """`statemesh batch ARGS` with stderr on a pseudo-terminal (80 columns), in a process group of
    its own: the embedded Ray cluster's processes are in it, and must be gone after it exits."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    process = subprocess.Popen([str(BIN / "statemesh"), "batch", *args], stdout=subprocess.DEVNULL, stderr=slave,
                               start_new_session=True, env=batch_env())  # fmt: skip
    os.close(slave)
    drawn: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not data:
                return
            drawn.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = process.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"statemesh batch did not end in {RUN_TIMEOUT_S} s: {b''.join(drawn)[-3000:]!r}") from None
    deadline = time.monotonic() + 15.0
    while True:
        group = subprocess.run(["pgrep", "-a", "-g", str(process.pid)], capture_output=True, text=True).stdout
        if not group or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    reader.join(5.0)
    os.close(master)
    return OnTerminal(returncode, b"".join(drawn).decode(errors="replace"), group.splitlines())


def test_batch_on_its_own_embedded_cluster_gives_the_engines_tokens_for_every_line(
    tmp_path: Path, chat_model: Path
) -> None:
    path, out = write_lines(tmp_path / "in.jsonl", LINES), tmp_path / "out.jsonl"
    run = run_on_a_terminal([str(path), str(out), "--model", str(chat_model), "--replicas", "2", *ENGINE_ARGS,
                             "--num-cpus", "2"])  # fmt: skip
    assert run.returncode == 0, run.terminal[-3000:]
    assert_every_line_is_the_engines(out, reference_model(chat_model))
    requests, errors, skipped, _, generated = summary(run.terminal)
    assert (requests, errors, skipped) == (len(LINES), 0, 0)
    assert generated == sum(len(json.loads(raw)["token_ids"]) for raw in out.read_text().splitlines())
    # tqdm's bar, drawn on the terminal: the lines done of all, the rate and the ETA
    bar = rf"statemesh batch: 100%\|.*\| {len(LINES)}/{len(LINES)} \[\d\d:\d\d<00:00, +[\d.]+(line/s|s/line)"
    assert re.search(bar, run.terminal), run.terminal[-3000:]
    assert run.group_left == [], "the embedded Ray cluster left processes running"


# ---- a `ray start --head` cluster: a server joins it (--address), and a Ray job runs on it -------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Head:
    process: subprocess.Popen[bytes]
    gcs_address: str  # what a driver joins: 127.0.0.1:PORT
    dashboard: str  # where `ray job submit` goes: http://127.0.0.1:PORT
    env: dict[str, str]  # Ray's token authentication, the venv's bin on PATH (for the job's entrypoint)
    temp_dir: Path

    def ray_pids(self) -> list[int]:
        """Every Ray worker and driver process this cluster ran (Ray names their logs after their pids)."""
        logs = self.temp_dir.glob("session_*/logs/python-core-*_*.log")
        return [int(m[1]) for p in logs if (m := re.search(r"_(\d+)\.log$", p.name))]


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A one-node cluster as an operator starts it (ENVIRONMENT.md): loopback, token authentication,
    its dashboard (the job server) on a free port; every port it opens chosen free, so that it does
    not meet another test's cluster. Ended by signalling its process group, never `ray stop`, which
    would end every Ray cluster of the machine."""
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="smb-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**batch_env(), "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--include-dashboard", "true", "--dashboard-agent-listen-port", str(free_port()),
               "--ray-client-server-port", str(free_port()), "--num-cpus", "4", "--temp-dir", str(temp_dir),
               "--disable-usage-stats"]  # fmt: skip
    log = temp_dir / "head.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = Head(process, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", env, temp_dir)
    try:
        wait_for_dashboard(head, log)
        yield head
    finally:
        stop_head(head)
    pids = head.ray_pids()
    assert pids, "no Ray worker logs found: the leftover check below would check nothing"
    alive = [pid for pid in pids if _alive(pid)]
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert alive == [], f"Ray processes of the head still alive: {alive}"


def wait_for_dashboard(head: Head, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline and head.process.poll() is None:
        try:
            urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2.0)
            return
        except urllib.error.HTTPError:  # it answers (401 without Ray's token): up
            return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"the Ray head did not start; its log:\n{log.read_text()[-3000:]}")


def stop_head(head: Head) -> None:
    """SIGTERM to the head's group, then SIGKILL once it has had 5 s (it would otherwise drain for 30)."""
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(head.process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(5.0)
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(head.process.pid, signal.SIGKILL)
    head.process.wait()
    deadline = time.monotonic() + 20.0  # workers leave once they find their raylet gone
    while any(_alive(pid) for pid in head.ray_pids()) and time.monotonic() < deadline:
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def server(head: Head, chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`statemesh serve --ray-address` on the head's cluster: one replica of the chat model."""
    saved = dict(os.environ)
    os.environ.update({"RAY_AUTH_MODE": "token"})  # start_service passes the test's environment on
    try:
        service = start_service(["--ray-address", head.gcs_address, "--model", str(chat_model), "--replicas", "1",
                                 *ENGINE_ARGS], tmp_path_factory.mktemp("batch_server") / "server.log")  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield service
    assert service.stop() == 0
    assert leftovers(service) == [], "the server left processes running"


# ---- (c) against a running server, (b) resumed ------------------------------------------------------


@pytest.fixture(scope="module")
def served_out(server: Service, chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of the whole of LINES, run against the server."""
    folder = tmp_path_factory.mktemp("served")
    path, out = write_lines(folder / "in.jsonl", LINES), folder / "out.jsonl"
    done = run_batch([str(path), str(out), "--address", server.address])
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done.stderr)[:3] == (len(LINES), 0, 0)
    assert "%|" not in done.stderr  # stderr is not a terminal: no bar
    return out


def test_batch_against_a_running_server_gives_the_engines_tokens_for_every_line(
    served_out: Path, chat_model: Path
) -> None:
    assert_every_line_is_the_engines(served_out, reference_model(chat_model))


def test_a_rerun_fills_exactly_the_lines_missing_from_out(served_out: Path, server: Service, chat_model: Path) -> None:
    path = served_out.parent / "in.jsonl"
    out = served_out.parent / "resumed.jsonl"
    raw = served_out.read_text().splitlines(keepends=True)
    kept, dropped, cut = raw[:2] + raw[3:5], [raw[2], raw[5]], raw[6]
    out.write_text("".join(kept) + cut[: len(cut) // 2])  # two lines lost, the last cut short by a "crash"
    done = run_batch([str(path), str(out), "--address", server.address])
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done.stderr)[:3] == (3, 0, 4)
    lines = out.read_text().splitlines(keepends=True)
    assert lines[:4] == kept  # what was done stays as it was; the rest is appended
    refilled = {json.loads(line)["id"] for line in lines[4:]}
    assert len(lines) == len(LINES) and refilled == {json.loads(line)["id"] for line in [*dropped, cut]}
    assert_every_line_is_the_engines(out, reference_model(chat_model))
    again = run_batch([str(path), str(out), "--address", server.address])
    assert again.returncode == 0 and "nothing to do" in again.stderr and out.read_text() == "".join(lines)


def test_lines_the_model_refuses_get_their_error_and_the_others_run(tmp_path: Path, server: Service) -> None:
    lines = [{"id": "fine", "token_ids": prompt(3), **GREEDY},
             {"id": "vocab", "token_ids": [5, 384], **GREEDY},  # the fixture's vocabulary is 0 .. 383
             {"id": "long", "token_ids": [k % 300 + 1 for k in range(600)], **GREEDY}]  # fmt: skip  # n_ctx is 512
    path, out = write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    done = run_batch([str(path), str(out), "--address", server.address])
    assert done.returncode == 1, done.stderr[-3000:]
    assert summary(done.stderr)[:3] == (3, 2, 0) and "2 lines failed" in done.stderr
    by_id = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert by_id["fine"]["finish_reason"] == "length" and len(by_id["fine"]["token_ids"]) == GREEDY["max_tokens"]
    assert by_id["vocab"]["error"].startswith("INVALID_ARGUMENT: ") and "vocabulary" in by_id["vocab"]["error"]
    assert by_id["long"]["error"].startswith("OUT_OF_RANGE: ") and "context" in by_id["long"]["error"]


# ---- (d) as a Ray job ---------------------------------------------------------------------------------


def test_batch_submitted_as_a_ray_job_runs_on_that_cluster(
    head: Head, server: Service, chat_model: Path, tmp_path: Path
) -> None:
    """`ray job submit -- statemesh batch ...`: the job's entrypoint finds the cluster by the
    RAY_ADDRESS Ray gives it and starts its replica there (beside the server's)."""
    path, out = write_lines(tmp_path / "in.jsonl", LINES), tmp_path / "out.jsonl"
    command = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--", "statemesh", "batch",
               str(path), str(out), "--model", str(chat_model), "--replicas", "1", *ENGINE_ARGS]  # fmt: skip
    for _ in range(JOB_SERVER_TRIES):  # the job server may come up a few seconds after the dashboard answers
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=head.env)
        log = done.stdout + done.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(2.0)
    assert done.returncode == 0 and "succeeded" in log, log[-4000:]
    assert summary(log)[:3] == (len(LINES), 0, 0)
    assert f"Connecting to existing Ray cluster at address: {head.gcs_address}" in log  # the head's, not its own
    assert_every_line_is_the_engines(out, reference_model(chat_model))
