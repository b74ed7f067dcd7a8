"""`statemesh batch IN.jsonl OUT.jsonl`: offline generation over the cluster's replicas (API.md).

IN holds one JSON object a line: the prompt as `prompt` (text), `token_ids` or chat `messages`
(exactly one of them), an optional `id` (a string or an integer; default: the line's number,
counting from 1) and sampling fields by their `SamplingParams` names. OUT gets one object a line as
each request finishes, in the order they finish:

    {"id": 3, "text": " Paris.", "token_ids": [...], "finish_reason": "stop", "usage": {...}}

Bad input stops the run before anything starts: each line that is not a JSON object, has no prompt
or more than one, names an unknown field, repeats an id or gives a sampling value of the wrong type
or outside its range is reported with its line number, and the exit status is 2. What only the
model can refuse (a prompt longer than the context, a token id outside the vocabulary, messages for
a model without a chat template) becomes that line's output, `{"id": 3, "error": "OUT_OF_RANGE: ..."}`,
and the other lines go on; the exit status is then 1.

A rerun with the same OUT resumes: the ids OUT holds are skipped (error lines too: delete them
from OUT to retry them), and a last line that a crash cut short is removed and redone. Each line is
written whole and flushed as its request finishes, so a crash loses only the requests in flight.

Where requests run: with `address`, on a running server (`AsyncClient`); otherwise on replicas of
its own, started on the Ray cluster at `ray_address` (`$RAY_ADDRESS` by default, which `ray job
submit` sets for its entrypoint) or on an embedded local cluster, and driven by an in-process
`Coordinator`. Either way `concurrency` requests are in flight at once (2 x replicas x the engine's
sequences by default), so that every engine has a full batch and the next requests waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from statemesh.cluster import ray_cluster
from statemesh.cluster.client import AsyncClient, StatemeshError
from statemesh.cluster.coordinator import Coordinator, GenerateCall, Prompt
from statemesh.cluster.errors import QueueFull
from statemesh.cluster.replica import Replica
from statemesh.cluster.server import status_of
from statemesh.cluster.service import ServiceConfig, start_replicas
from statemesh.worker.engine.engine import EngineConfig
from statemesh.worker.engine.sampling import InvalidSampling, SamplingParams

PROMPT_FIELDS = ("prompt", "token_ids", "messages")
# Each sampling field and the JSON type it takes (null: unset, the engine's default). Checked here
# before SamplingParams checks the ranges, since a string where a number belongs would otherwise
# fail with a comparison's TypeError that names neither the field nor what it should be.
SAMPLING_TYPES: dict[str, str] = {
    "max_tokens": "integer", "temperature": "number", "top_k": "integer", "top_p": "number", "min_p": "number",
    "repetition_penalty": "number", "presence_penalty": "number", "frequency_penalty": "number",
    "seed": "integer", "logprobs": "integer", "stop": "strings", "stop_token_ids": "integers", "ignore_eos": "boolean",
}  # fmt: skip
# A refusal that is the line's own (its prompt, its values): written to OUT as that line's error.
# Anything else (no replica left, a broken connection) stops the run; a rerun picks up from there.
LINE_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION)
QUEUE_FULL_WAIT_S = 0.5  # a server whose queues are full (other clients' requests) is asked again after this
MAX_REPORTED = 20  # bad input lines listed before "... and N more"


class BadInput(ValueError):
    """IN (or OUT) cannot be used; the message lists each bad line with its number and what was wrong."""


class BatchAborted(RuntimeError):
    """A request failed for a reason that is not its line's (e.g. no replica left); the lines done so
    far stay in OUT."""


@dataclass(frozen=True)
class BatchConfig:
    input: Path
    output: Path
    model_path: str
    replicas: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: ray_cluster.RayOptions = field(default_factory=ray_cluster.RayOptions)
    address: str | None = None  # a running server; None: replicas of its own on Ray
    token: str | None = field(default=None, repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)
    concurrency: int | None = None  # requests in flight; None: 2 x replicas x engine.n_seq_max


# ---- input ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLine:
    """One line of IN, checked: its id, its prompt (exactly one kind) and its sampling values."""

    id: str | int
    number: int  # the line's number in IN, from 1
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # set fields only, by SamplingParams name

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)


def read_input(path: Path) -> list[BatchLine]:
    """Every line of IN, checked; raises BadInput listing every bad line. Blank lines are skipped
    (they keep their numbers)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {path}: {e}; expected a UTF-8 file of JSON lines") from None
    lines: list[BatchLine] = []
    problems: list[str] = []
    seen: dict[str | int, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = parse_line(raw, number)
        except ValueError as e:
            problems.append(f"{path}:{number}: {e}")
            continue
        if line.id in seen:
            problems.append(f"{path}:{number}: id {line.id!r} is also line {seen[line.id]}'s; ids must be unique")
            continue
        seen[line.id] = number
        lines.append(line)
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORTED} more bad lines" if len(problems) > MAX_REPORTED else ""
        raise BadInput("\n".join(problems[:MAX_REPORTED]) + more)
    return lines


def parse_line(raw: str, number: int) -> BatchLine:
    """One line of IN; raises ValueError saying what is wrong and what is expected."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno}); expected one JSON object a line") from None
    if not isinstance(obj, dict):
        raise ValueError(f'a JSON {type(obj).__name__}; expected an object such as {{"prompt": "..."}}')
    unknown = sorted(set(obj) - {"id", *PROMPT_FIELDS, *SAMPLING_TYPES})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; expected id, one of {list(PROMPT_FIELDS)}, and sampling "
                         f"fields {list(SAMPLING_TYPES)}")  # fmt: skip
    given = [name for name in PROMPT_FIELDS if obj.get(name) is not None]
    if len(given) != 1:
        raise ValueError(f"{'no prompt' if not given else f'more than one prompt ({given})'}; expected exactly "
                         f"one of {list(PROMPT_FIELDS)}")  # fmt: skip
    line_id = obj.get("id", number)
    if isinstance(line_id, bool) or not isinstance(line_id, (str, int)):
        raise ValueError(f"id {line_id!r} must be a string or an integer")
    sampling = {
        name: _checked(name, value) for name, value in obj.items() if name in SAMPLING_TYPES and value is not None
    }
    try:
        SamplingParams(**sampling)
    except InvalidSampling as e:
        raise ValueError(str(e)) from None
    if given == ["prompt"]:
        return BatchLine(line_id, number, text=_prompt_text(obj["prompt"]), sampling=sampling)
    if given == ["token_ids"]:
        return BatchLine(line_id, number, token_ids=_token_ids(obj["token_ids"]), sampling=sampling)
    return BatchLine(line_id, number, messages=_messages(obj["messages"]), sampling=sampling)


def _checked(name: str, value: Any) -> Any:
    kind = SAMPLING_TYPES[name]
    ok = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "integers": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[kind]
    if not ok:
        what = f"a list of {kind}" if kind.endswith("s") else f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def _prompt_text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"prompt must be non-empty text, got {value!r}")
    return value


def _token_ids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and t >= 0 for t in value):
        raise ValueError(f"token_ids must be a non-empty list of token ids (integers >= 0), got {str(value)[:80]}")
    return tuple(value)


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    good = isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
        for m in value
    )  # fmt: skip
    if not good:
        raise ValueError(f'messages must be a non-empty list of {{"role": ..., "content": ...}} strings, '
                         f"got {str(value)[:80]}")  # fmt: skip
    return tuple((m["role"], m["content"]) for m in value)


# ---- output: resumable ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """What OUT already holds: the ids done, and how many of them are errors."""

    ids: set[str | int]
    errors: set[str | int]


def resume_output(path: Path) -> Done:
    """The ids OUT holds. A last line without its newline (a crash cut it short) is cut off the file,
    so that what is appended next starts a line of its own. Raises BadInput, with the file untouched,
    when a whole line is not one of ours: OUT is then some other file, and appending would mix the two."""
    if not path.exists():
        return Done(set(), set())
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e}") from None
    complete = data.rfind(b"\n") + 1  # the bytes up to and including the last newline
    ids: set[str | int] = set()
    errors: set[str | int] = set()
    for number, raw in enumerate(data[:complete].splitlines(), start=1):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or "id" not in obj:
            raise BadInput(f"{path}:{number} is not a line statemesh batch wrote (a JSON object with an id); "
                           "give another OUT, or remove that line")  # fmt: skip
        ids.add(obj["id"])
        if "error" in obj:
            errors.add(obj["id"])
    if complete < len(data):
        with open(path, "r+b") as f:
            f.truncate(complete)
    return Done(ids, errors)


@dataclass(frozen=True)
class Result:
    """A finished request, as its OUT line says it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None  # one per token, when the line asked for them

    def record(self, line_id: str | int) -> dict[str, Any]:
        out: dict[str, Any] = {"id": line_id, "text": self.text, "token_ids": self.token_ids,
                               "finish_reason": self.finish_reason,
                               "usage": {"prompt_tokens": self.prompt_tokens,
                                         "completion_tokens": self.completion_tokens}}  # fmt: skip
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


def _logprob(token_id: int, logprob: float, top: Iterator[tuple[int, float]]) -> dict[str, Any]:
    return {"token_id": token_id, "logprob": logprob, "top": [{"token_id": t, "logprob": lp} for t, lp in top]}


# ---- where requests run -----------------------------------------------------------------------------


class Generator(Protocol):
    async def complete(self, line: BatchLine) -> Result: ...


@dataclass
class InProcess:
    """Requests through a Coordinator of this process, on its own replicas."""

    coordinator: Coordinator

    async def complete(self, line: BatchLine) -> Result:
        prompt = Prompt(line.text, line.token_ids, line.messages)
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[dict[str, Any]] = []
        finish, usage = "", None
        async for chunk in self.coordinator.generate(GenerateCall("", prompt, line.params)):
            text.append(chunk.text)
            ids += chunk.token_ids
            logprobs += [_logprob(e.token, e.logprob, iter(e.top_logprobs))
                         for e in chunk.events if e.token >= 0 and e.logprob is not None]  # fmt: skip
            finish, usage = chunk.finish_reason or finish, chunk.usage or usage
        prompt_tokens = usage.prompt_tokens if usage is not None else 0
        asked = line.sampling.get("logprobs") is not None
        return Result("".join(text), ids, finish, prompt_tokens, len(ids), logprobs if asked else None)


@dataclass
class Remote:
    """Requests to a running server, through the Python client."""

    client: AsyncClient

    async def complete(self, line: BatchLine) -> Result:
        prompt: str | list[int] | list[dict[str, str]]
        if line.text is not None:
            prompt = line.text
        elif line.token_ids is not None:
            prompt = list(line.token_ids)
        else:
            prompt = [{"role": role, "content": content} for role, content in line.messages or ()]
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[dict[str, Any]] = []
        finish, usage = "", None
        async for chunk in self.client.generate(prompt, **line.sampling):
            text.append(chunk.text)
            ids += chunk.token_ids
            logprobs += [_logprob(p.token_id, p.logprob, ((t.token_id, t.logprob) for t in p.top))
                         for p in chunk.logprobs]  # fmt: skip
            finish = chunk.finish_reason or finish
            usage = chunk.usage if chunk.HasField("usage") else usage
        prompt_tokens = usage.prompt_tokens if usage is not None else 0
        asked = line.sampling.get("logprobs") is not None
        return Result("".join(text), ids, finish, prompt_tokens, len(ids), logprobs if asked else None)


@contextlib.asynccontextmanager
async def own_replicas(config: BatchConfig) -> AsyncIterator[tuple[Generator, int]]:
    """Replicas of this run's own on Ray, and a Coordinator over them; (generator, default
    concurrency). Leaving stops the replicas, and the embedded Ray cluster when it started one
    (from a joined cluster it only disconnects)."""
    replicas: list[Replica] = []
    coordinator: Coordinator | None = None
    try:
        # Ray starts on a thread of its own, as in `run_service`: off the main thread it leaves the
        # process's signal handlers alone, and a SIGTERM still cancels the run cleanly
        await asyncio.get_running_loop().run_in_executor(None, ray_cluster.start_ray, config.ray)
        service = ServiceConfig(model_path=config.model_path, replicas=config.replicas, engine=config.engine,
                                ray=config.ray)  # fmt: skip
        replicas = await start_replicas(service)
        coordinator = Coordinator(
            replicas, prefix_block=config.engine.prefix_block, max_in_flight=service.max_in_flight
        )
        yield InProcess(coordinator), 2 * len(replicas) * config.engine.n_seq_max
    finally:
        if coordinator is not None:
            await coordinator.close()
        for r in replicas:
            ray_cluster.release(r.placement)
        ray_cluster.stop_ray()


@contextlib.asynccontextmanager
async def running_server(config: BatchConfig) -> AsyncIterator[tuple[Generator, int]]:
    """The server at `config.address`; (generator, default concurrency from its ready replicas)."""
    assert config.address is not None
    client = AsyncClient(config.address, token=config.token, tls_ca=config.tls_ca)
    try:
        ready = [r for r in await client.replicas() if r.state == "ready"]
        yield Remote(client), 2 * max(len(ready), 1) * config.engine.n_seq_max
    finally:
        await client.close()


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def run_batch(config: BatchConfig) -> int:
    """The whole command; returns the exit status: 0 when every line of IN has its output in OUT,
    1 when some are errors (or the run stopped early), 2 on bad input (before anything started)."""
    lines = read_input(config.input)
    done = resume_output(config.output)
    todo = [line for line in lines if line.id not in done.ids]
    skipped = len(lines) - len(todo)
    if not todo:
        _say(f"nothing to do: all {len(lines)} lines of {config.input} are in {config.output}")
        return 1 if done.errors & {line.id for line in lines} else 0
    try:
        out = open(config.output, "a", encoding="utf-8")  # noqa: SIM115 - open before the start-up: fail early
    except OSError as e:
        raise BadInput(f"cannot write {config.output}: {e}") from None
    started = time.monotonic()
    tally = Tally()
    source = running_server(config) if config.address is not None else own_replicas(config)
    with out:
        async with source as (generator, default_concurrency):
            ready = time.monotonic()
            concurrency = config.concurrency or default_concurrency
            with _bar(len(lines), skipped) as bar:
                await _run_lines(todo, generator, min(concurrency, len(todo)), out, bar, tally)
            seconds = time.monotonic() - ready
    _say(f"{tally.requests} requests ({tally.errors} errors, {skipped} already in OUT), {tally.prompt_tokens} prompt "
         f"tokens, {tally.completion_tokens} generated tokens in {seconds:.2f} s: "
         f"{tally.completion_tokens / max(seconds, 1e-9):.1f} generated tokens/s "
         f"(start-up {ready - started:.1f} s)")  # fmt: skip
    errors = tally.errors + len(done.errors & {line.id for line in lines})
    if errors:
        _say(f"{errors} lines failed: see the error field of their lines in {config.output}")
    return 1 if errors else 0


async def _run_lines(
    todo: list[BatchLine], generator: Generator, workers: int, out: Any, bar: Any, tally: Tally
) -> None:
    """`workers` requests in flight, each worker taking the next line as its request finishes; each
    result is written to OUT (one line, flushed) as it comes. The first error that is not a line's
    own cancels the others and is raised."""
    pending = iter(todo)  # shared: each line is taken by exactly one worker (no await between next()s)
    started = time.monotonic()

    async def worker() -> None:
        for line in pending:
            record = await _complete(generator, line)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            tally.requests += 1
            if "error" in record:
                tally.errors += 1
            else:
                tally.prompt_tokens += record["usage"]["prompt_tokens"]
                tally.completion_tokens += record["usage"]["completion_tokens"]
            bar.set_postfix_str(f"{tally.completion_tokens / max(time.monotonic() - started, 1e-9):.0f} tok/s",
                                refresh=False)  # fmt: skip
            bar.update(1)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(worker())
    except ExceptionGroup as failed:  # the first worker's error; the group cancelled the others
        raise failed.exceptions[0] from None


async def _complete(generator: Generator, line: BatchLine) -> dict[str, Any]:
    """The line's OUT record: its result, or its error when the refusal is the line's own. Full
    queues are waited out."""
    while True:
        try:
            return (await generator.complete(line)).record(line.id)
        except Exception as e:
            code = e.code if isinstance(e, StatemeshError) else status_of(e)
            if isinstance(e, QueueFull) or code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(QUEUE_FULL_WAIT_S)
                continue
            if code is not None and code in LINE_ERRORS:
                message = e.message if isinstance(e, StatemeshError) else str(e)
                return {"id": line.id, "error": f"{code.name}: {message}"}
            raise BatchAborted(f"line {line.number} (id {line.id!r}) failed: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _bar(total: int, initial: int) -> Iterator[Any]:
    """The progress bar on stderr: lines done of IN (those done before count from the start), rate
    and ETA; silent when stderr is not a terminal. Log records (Ray's too) go through the bar, so
    they do not break it."""
    bar = tqdm(total=total, initial=initial, desc="statemesh batch", unit="line", file=sys.stderr, disable=None,
               dynamic_ncols=True)  # fmt: skip
    try:
        with logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("ray")]):
            yield bar
    finally:
        bar.close()


def _say(message: str) -> None:
    print(f"statemesh batch: {message}", file=sys.stderr, flush=True)


def main(config: BatchConfig) -> int:
    """Run the batch; SIGTERM (e.g. `ray job stop`) and Ctrl-C stop it cleanly, replicas and embedded
    cluster included, and what finished stays in OUT for a rerun."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_batch(config)

    try:
        return asyncio.run(guarded())
    except BadInput as e:
        print(f"statemesh batch: bad input, nothing was run:\n{e}", file=sys.stderr)
        return 2
    except (BatchAborted, StatemeshError, ray_cluster.PlacementError) as e:
        _say(f"stopped: {e}\nthe lines done are in {config.output}; rerun the same command to do the rest")
        return 1
    except (asyncio.CancelledError, KeyboardInterrupt):
        _say(f"interrupted; the lines done are in {config.output}; rerun the same command to do the rest")
        return 130
