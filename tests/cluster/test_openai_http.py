"""The OpenAI-compatible HTTP front (issue 16), through the official `openai` client: `statemesh serve
--http-port 0` of the llama fixture (a copy given a chat template, so chat runs too), its answers
checked against the gRPC client's for the same parameters, its errors against OpenAI's shapes and
statuses. The token and the 503 of a coordinator with no replica are checked on an in-process front."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from statemesh.cluster import Client
from statemesh.cluster.coordinator import Coordinator
from statemesh.cluster.errors import QueueFull, Unavailable
from statemesh.cluster.http_front import HttpFront, api_error

from .conftest import FIXTURES, Service, chat_model, leftovers, start_service

MODEL = "llama-chat"  # the folder's name is the model's name
PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
SEEDED = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
LONG = 3000  # tokens a request left running would still produce for seconds (n_ctx below is 4096)


def serve(model: Path, log: Path) -> Service:
    args = ["--model", str(model), "--replicas", "1", "--n-ctx", "4096", "--max-seqs", "4", "--http-port", "0"]
    return start_service(args, log)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("openai_http")
    service = serve(chat_model(root / MODEL), root / "server.log")
    pids = [w.pid for r in Client(service.address).replicas() for w in r.workers]
    yield service
    assert service.stop() == 0
    assert leftovers(service, pids) == []


@pytest.fixture(scope="module")
def oai(service: Service) -> openai.OpenAI:
    # no retries: a 429 or 503 must reach the test as it came
    return openai.OpenAI(base_url=f"http://{service.also_listening['http']}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(service: Service) -> Iterator[Client]:
    with Client(service.address) as client:
        yield client


def http_post(service: Service, path: str, data: bytes) -> tuple[int, dict[str, Any]]:
    """A raw POST (what the openai client would never send); the status and the JSON body."""
    request = urllib.request.Request(f"http://{service.also_listening['http']}{path}", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- answers ------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, SEEDED], ids=["greedy", "seeded"])
def test_completion_equals_the_grpc_client(oai: openai.OpenAI, grpc_client: Client, sampling: dict[str, Any]) -> None:
    done = oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True}, **sampling
    )
    expected = grpc_client.complete(PROMPT, max_tokens=12, ignore_eos=True, **sampling)
    assert done.object == "text_completion" and done.model == MODEL and done.id.startswith("cmpl-")
    assert done.choices[0].text == expected.text
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert done.usage.prompt_tokens == len(grpc_client.tokenize(PROMPT)) == expected.usage.prompt_tokens
    assert done.usage.completion_tokens == 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12


def test_same_seed_same_text_other_seed_other_text(oai: openai.OpenAI) -> None:
    def text(seed: int) -> str:
        done = oai.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
        )
        return done.choices[0].text

    first = text(11)
    assert text(11) == first
    assert any(text(seed) != first for seed in (12, 13, 14))  # the seed is used, not ignored


def test_token_id_prompt(oai: openai.OpenAI, grpc_client: Client) -> None:
    ids = grpc_client.tokenize(PROMPT)
    done = oai.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert done.choices[0].text == grpc_client.complete(ids, max_tokens=8, temperature=0.0, ignore_eos=True).text
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)


def test_streamed_completion_is_the_whole_one_in_pieces(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    events = list(
        oai.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    pieces = [e for e in events if e.choices]
    assert "".join(e.choices[0].text for e in pieces) == whole.choices[0].text
    assert [e.choices[0].finish_reason for e in pieces][-1] == "length"
    assert all(e.choices[0].finish_reason is None for e in pieces[:-1])
    assert not events[-1].choices and events[-1].usage == whole.usage  # include_usage: a last chunk with it


def test_completion_logprobs_are_the_grpc_ones(oai: openai.OpenAI, grpc_client: Client) -> None:
    done = oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs and logprobs.top_logprobs and logprobs.tokens
    expected = [
        lp
        for r in grpc_client.generate(PROMPT, max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
        for lp in r.logprobs
    ]
    assert len(logprobs.tokens) == len(expected) == 6
    for got, top, want in zip(logprobs.token_logprobs, logprobs.top_logprobs, expected, strict=True):
        assert got == pytest.approx(want.logprob, abs=1e-6)
        assert 1 <= len(top) <= 3  # token texts can coincide (e.g. two byte tokens shown as U+FFFD)
        assert max(top.values()) == pytest.approx(got, abs=1e-6)  # greedy: the chosen token is the likeliest
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0


def test_stop_strings_cut_the_text(oai: openai.OpenAI) -> None:
    full = (
        oai.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    at = next(i for i in range(4, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isalnum())
    stop = full[at : at + 2]
    for given in (stop, ["never-in-this-text", stop]):
        done = oai.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=given, extra_body={"ignore_eos": True}
        )
        assert done.choices[0].text == full[: full.index(stop)]
        assert done.choices[0].finish_reason == "stop"


def test_chat_equals_the_grpc_client(oai: openai.OpenAI, grpc_client: Client) -> None:
    done = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    expected = grpc_client.complete(MESSAGES, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected.text
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.prompt_tokens == expected.usage.prompt_tokens
    assert done.usage.completion_tokens == 8


def test_chat_streams_with_usage_and_logprobs(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 5  # max_completion_tokens counts
    content = whole.choices[0].logprobs and whole.choices[0].logprobs.content
    assert content and len(content) == 5
    assert all(1 <= len(c.top_logprobs) <= 2 and c.logprob <= 0 and c.bytes == list(c.token.encode()) for c in content)
    events = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_completion_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    pieces = [e for e in events if e.choices]
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in pieces) == whole.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == "length"
    assert events[-1].object == "chat.completion.chunk" and events[-1].usage == whole.usage


def test_unknown_fields_are_ignored(oai: openai.OpenAI) -> None:
    done = oai.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=2,
        user="someone",
        extra_body={"a_field_of_a_newer_api": {"x": 1}, "ignore_eos": True},
    )
    assert done.usage is not None and done.usage.completion_tokens == 2


def test_a_session_continues_over_http(oai: openai.OpenAI, grpc_client: Client) -> None:
    session = grpc_client.create_session()
    oai.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=3,
        temperature=0,
        extra_body={"session_id": session.session_id, "ignore_eos": True},
    )
    held = grpc_client.get_session(session.session_id).n_tokens
    assert held >= len(grpc_client.tokenize(PROMPT)) + 2  # the prompt and the turn's tokens stay (the last may not)
    grpc_client.delete(session.session_id)


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 99}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"extra_body": {"stop": 5}}, "stop"),
        ({"extra_body": {"top_k": "many"}}, "top_k"),
    ],
)
def test_invalid_values_are_400_with_the_field(oai: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=PROMPT, **{"max_tokens": 4, **fields})
    assert caught.value.status_code == 400
    assert caught.value.param == param and caught.value.type == "invalid_request_error"
    assert caught.value.message


def test_bad_prompts_are_400(oai: openai.OpenAI) -> None:
    for prompt, says in (([10**9], "vocabulary"), ([7] * 5000, "context"), ("", "empty")):
        with pytest.raises(openai.BadRequestError) as caught:
            oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        assert says in str(caught.value.message), caught.value.message


def test_unknown_model_is_404(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=4)
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")


def test_raw_bad_requests_get_openai_error_bodies(service: Service) -> None:
    status, body = http_post(service, "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = http_post(service, "/v1/completions", b"[1, 2]")
    assert status == 400 and "object" in body["error"]["message"]
    status, body = http_post(service, "/v1/no-such-route", b"{}")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_chat_without_a_template_is_400_and_the_token_guards_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain llama fixture (no chat template), served with a token ($STATEMESH_TOKEN): HTTP
    asks for the same token as gRPC."""
    token = "http-test-token-0123456789"
    monkeypatch.setenv("STATEMESH_TOKEN", token)
    plain = serve(FIXTURES / "llama", tmp_path / "server.log")
    try:
        base_url = f"http://{plain.also_listening['http']}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="not-the-token", max_retries=0).models.list()
        client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=4)
        assert "chat template" in caught.value.message
    finally:
        assert plain.stop() == 0
    assert leftovers(plain) == []


# ---- a client that leaves -----------------------------------------------------------------------------


def test_an_abandoned_stream_leaves_no_request_running(oai: openai.OpenAI, grpc_client: Client) -> None:
    before = grpc_client.stats().generation_tokens
    stream = oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    received = 0
    for event in stream:
        received += bool(event.choices and event.choices[0].text)
        if received == 3:
            break
    assert sum(r.running + r.waiting for r in grpc_client.replicas()) == 1  # it runs, far from done
    stream.close()  # the connection goes; the server must cancel the request
    deadline = time.monotonic() + 15.0
    while sum(r.running + r.waiting for r in grpc_client.replicas()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sum(r.running + r.waiting for r in grpc_client.replicas()) == 0, "the abandoned request still runs"
    assert grpc_client.stats().generation_tokens - before < LONG  # cancelled, not run to its end


# ---- the token, and errors no running service shows: an in-process front --------------------------------


async def _against_front(check: Any) -> None:
    """Run `check(base_url)` against a front on a coordinator with no replica and the token "s3cret"."""
    front = HttpFront(Coordinator(replicas=[]), "127.0.0.1", 0, "tiny", token="s3cret")
    await front.start()
    try:
        await check(f"http://127.0.0.1:{front.port}/v1")
    finally:
        await front.stop()


def test_token_is_required_when_configured() -> None:
    async def check(base_url: str) -> None:
        for key in ("wrong", "s3cre", "s3cret2"):
            client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.models.list()
            assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        client = openai.AsyncOpenAI(base_url=base_url, api_key="s3cret", max_retries=0)
        assert [m.id async for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.InternalServerError) as unavailable:  # the token passes; no replica serves
            await client.completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert unavailable.value.status_code == 503
        assert isinstance(unavailable.value.body, dict) and unavailable.value.body["code"] == "unavailable"

    asyncio.run(_against_front(check))


def test_domain_errors_map_to_openai_statuses() -> None:
    full = api_error(QueueFull("every replica is full; retry in 1500 ms", 1500))
    assert full.status == 429 and full.body()["error"]["type"] == "rate_limit_error"
    assert full.headers == {"Retry-After": str(math.ceil(1.5)), "retry-after-ms": "1500"}
    assert api_error(Unavailable("no replica")).status == 503
    assert api_error(RuntimeError("a bug")).status == 500
