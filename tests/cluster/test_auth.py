"""Who may call (issue 15): with a token, every RPC but health's needs `authorization: Bearer <token>`
(UNAUTHENTICATED otherwise, whatever the service or call shape); over TLS, a client that trusts the
server's certificate gets through and one that does not is refused. One server, both on."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from statemesh.cluster import Client
from statemesh.cluster.auth import AuthConfigError, TlsFiles, read_token
from statemesh.cluster.cli import _loopback
from statemesh.cluster.client import StatemeshError

from .conftest import FIXTURES, Service, leftovers, start_service

TOKEN = "s3cret-token-of-32-characters-xx"
GREEDY = {"max_tokens": 4, "temperature": 0.0}


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "statemesh test")])
    now = datetime.datetime.now(datetime.UTC)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1)).add_extension(names, critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file.write_bytes(key_bytes)
    return cert_file, key_file


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, bytes]]:
    folder = tmp_path_factory.mktemp("auth")
    cert, key = self_signed(folder)
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    args = ["--model", str(FIXTURES / "llama"), "--n-ctx", "256", "--max-seqs", "2", "--http-port", "0",
            "--token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key)]  # fmt: skip
    service = start_service(args, folder / "server.log")
    ca = cert.read_bytes()
    with Client(service.address, token=TOKEN, tls_ca=ca) as client:
        pids = [w.pid for r in client.replicas() for w in r.workers]
    yield service, ca
    assert service.stop() == 0
    assert leftovers(service, pids) == []
    assert "warning" not in service.log.read_text()  # loopback: no warning about a missing token


def test_the_token_lets_every_kind_of_call_through(secured: tuple[Service, bytes]) -> None:
    service, ca = secured
    with Client(service.address, token=TOKEN, tls_ca=ca) as client:
        assert client.complete([5, 6, 7], **GREEDY).finish_reason == "length"  # unary -> stream
        assert client.tokenize("hi")  # unary
        client.create_session("mine")
        data = client.export_session("mine")  # unary -> stream
        client.import_session(data, "copy")  # stream -> unary
        assert {s.session_id for s in client.list_sessions()} == {"mine", "copy"}


@pytest.mark.parametrize("token", [None, "", "wrong-token-of-32-characters-xxx", TOKEN[:-1], TOKEN + "x"])
def test_no_token_or_a_wrong_one_is_unauthenticated_on_every_call_shape(
    secured: tuple[Service, bytes], token: str | None
) -> None:
    service, ca = secured
    with Client(service.address, token=token or None, tls_ca=ca) as client:
        for call in (
            lambda: client.complete([5, 6, 7], **GREEDY),
            lambda: client.tokenize("hi"),
            lambda: client.replicas(),
            lambda: client.import_session(b"SMSTATE\n" + bytes(64), "sneaky"),
            lambda: client.export_session("mine"),
        ):
            with pytest.raises(StatemeshError) as e:
                call()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in e.value.message


def test_health_needs_no_token(secured: tuple[Service, bytes]) -> None:
    service, ca = secured
    with grpc.secure_channel(service.address, grpc.ssl_channel_credentials(ca)) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_http_front_speaks_tls_with_the_same_certificate_and_token(secured: tuple[Service, bytes]) -> None:
    service, ca = secured
    address = service.also_listening["http"]
    trusted = ssl.create_default_context(cadata=ca.decode())
    with_token = urllib.request.Request(f"https://{address}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(with_token, context=trusted, timeout=10) as answer:
        assert [m["id"] for m in json.load(answer)["data"]]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"https://{address}/v1/models", context=trusted, timeout=10)
    assert e.value.code == 401
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(f"http://{address}/v1/models", timeout=10)  # plaintext to a TLS port


def test_a_client_that_does_not_trust_the_certificate_or_speaks_plaintext_is_refused(
    secured: tuple[Service, bytes], tmp_path: Path
) -> None:
    service, _ = secured
    other_ca, _ = self_signed(tmp_path)  # another certificate: not the one the server has
    with Client(service.address, token=TOKEN, tls_ca=other_ca.read_bytes()) as client:
        with pytest.raises(StatemeshError) as e:
            client.tokenize("hi")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    with Client(service.address, token=TOKEN) as plain:
        with pytest.raises(StatemeshError) as e:
            plain.tokenize("hi")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_command_line_client_takes_the_token_and_the_ca(secured: tuple[Service, bytes], tmp_path: Path) -> None:
    service, ca = secured
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca)
    command = [sys.executable, "-m", "statemesh.cluster.cli", "generate", "The capital of",
               "--address", service.address, "--max-tokens", "4", "--tls-ca", str(ca_file)]  # fmt: skip
    ok = subprocess.run(command, env={**os.environ, "STATEMESH_TOKEN": TOKEN}, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(command, env={**os.environ, "STATEMESH_TOKEN": ""}, capture_output=True, text=True)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_tokens_and_tls_files_that_cannot_be_used_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(AuthConfigError, match="at least 16 characters"):
        read_token(str(short))
    with pytest.raises(AuthConfigError, match="No such file"):
        read_token(str(tmp_path / "missing"))
    monkeypatch.setenv("STATEMESH_TOKEN", TOKEN)
    assert read_token(None) == TOKEN
    monkeypatch.setenv("STATEMESH_TOKEN", "")
    assert read_token(None) is None
    with pytest.raises(AuthConfigError, match="both --tls-cert and --tls-key"):
        TlsFiles.read(str(short), None)
    assert _loopback("127.0.0.1") and _loopback("localhost") and not _loopback("0.0.0.0")


def test_the_embedded_ray_cluster_runs_with_ray_token_authentication(secured: tuple[Service, bytes]) -> None:
    """Ray's own processes need Ray's token too (Ray 2.60 turns it on for a new local cluster,
    ENVIRONMENT.md): the workers run with RAY_AUTH_MODE=token, so nothing reaches them without it."""
    service, ca = secured
    with Client(service.address, token=TOKEN, tls_ca=ca) as client:
        pids = [w.pid for r in client.replicas() for w in r.workers]
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"RAY_AUTH_MODE=token" in environ, pid
