"""`statemesh`, the command line of API.md: `serve` runs the service; `generate` streams a prompt's
text from a running one.

    statemesh serve [--model PATH] [--replicas N] [--port P] ...
    statemesh generate "The capital of France is" --max-tokens 16 --temperature 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from statemesh.worker.engine.engine import EngineConfig


def _serve(args: argparse.Namespace) -> int:
    from statemesh.cluster.auth import AuthConfigError, TlsFiles, read_token
    from statemesh.cluster.errors import CannotListen
    from statemesh.cluster.ray_cluster import PlacementError, RayOptions
    from statemesh.cluster.service import ServiceConfig, parse_backends, run_service
    from statemesh.worker.loading.loader import default_model_path

    model = args.model or str(default_model_path())
    engine = EngineConfig(n_ctx=args.n_ctx, n_seq_max=args.max_seqs, checkpoint_every=args.checkpoint_every)
    try:
        token, tls = read_token(args.token_file), TlsFiles.read(args.tls_cert, args.tls_key)
        config = ServiceConfig(
            model_path=os.path.abspath(model), replicas=args.replicas, stages=args.stages, host=args.host,
            port=args.port, backends=parse_backends(args.backend), engine=engine,
            ray=RayOptions(address=args.ray_address, num_cpus=args.num_cpus), max_in_flight=args.max_in_flight,
            token=token, tls=tls, metrics_port=args.metrics_port, http_port=args.http_port,
        )  # fmt: skip
    except (ValueError, AuthConfigError) as e:
        print(f"statemesh serve: {e}", file=sys.stderr)
        return 2
    if token is None and not _loopback(args.host):
        print(f"statemesh serve: warning: listening on {args.host} without a token: anyone who reaches this "
              "port can use the service (give --token-file or $STATEMESH_TOKEN)", file=sys.stderr)  # fmt: skip
    try:
        asyncio.run(run_service(config))
    except (PlacementError, CannotListen) as e:  # the cluster cannot hold the replicas, a port is taken: no traceback
        print(f"statemesh serve: {e}", file=sys.stderr)
        return 1
    return 0


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _generate(args: argparse.Namespace) -> int:
    from statemesh.cluster.client import Client, StatemeshError

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
                "top_k": args.top_k, "top_p": args.top_p}  # fmt: skip
    token = args.token or os.environ.get("STATEMESH_TOKEN")
    tls_ca = open(args.tls_ca, "rb").read() if args.tls_ca else None  # noqa: SIM115 - read at once
    with Client(args.address, token=token, tls_ca=tls_ca) as client:
        try:
            if args.session:
                _ensure_session(client, args.session)
            for chunk in client.generate(args.prompt or None, session_id=args.session, **sampling):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except StatemeshError as e:
            print(f"\nstatemesh: {e}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0


def _ensure_session(client: object, session_id: str) -> None:
    import grpc

    from statemesh.cluster.client import Client, StatemeshError

    assert isinstance(client, Client)
    try:
        client.get_session(session_id)
    except StatemeshError as e:
        if e.code != grpc.StatusCode.NOT_FOUND:
            raise
        client.create_session(session_id)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="statemesh", description="distributed LLM inference over one memory interface")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service (an embedded local Ray cluster unless --ray-address)")
    serve.add_argument("--model", help="a GGUF file or a Hugging Face folder (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--stages", type=int, default=1, help="pipeline stages per replica")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0: a free port")
    serve.add_argument("--metrics-port", type=int, help="Prometheus metrics at /metrics on this port (0: a free one)")
    serve.add_argument("--http-port", type=int, help="the OpenAI-compatible HTTP API on this port (0: a free one)")
    serve.add_argument("--ray-address", help="join this Ray cluster (e.g. auto) instead of starting one")
    serve.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray cluster (default: the machine's)")
    serve.add_argument("--n-ctx", type=int, default=4096, help="token cells of each replica's KV cache")
    serve.add_argument("--max-seqs", type=int, default=32, help="sequences each replica runs at once")
    serve.add_argument(
        "--checkpoint-every", type=int, default=16,
        help="a recovery checkpoint of each running request every K tokens (the cells since the last one, "
        "and its recurrent and sampler state): a request whose worker dies goes on elsewhere from there (0: none)",
    )  # fmt: skip
    serve.add_argument(
        "--backend",
        default="numpy",
        help="array backend of the replicas' workers: auto, numpy or cupy, or a comma-separated list with one per "
        "replica (e.g. --replicas 2 --backend cupy,numpy: r0 on a GPU, r1 on the CPU). A cupy replica reserves "
        "one GPU (shared by its stages); auto takes cupy when the Ray cluster has a GPU free, numpy otherwise "
        "(default: numpy)",
    )
    serve.add_argument(
        "--max-in-flight", type=int, default=256,
        help="requests a replica takes before new ones get RESOURCE_EXHAUSTED with a retry hint",
    )  # fmt: skip
    serve.add_argument(
        "--token-file",
        help="a file holding the bearer token every call but health needs (default: $STATEMESH_TOKEN; none: no token)",
    )
    serve.add_argument("--tls-cert", help="the server's certificate chain, PEM (with --tls-key: gRPC over TLS)")
    serve.add_argument("--tls-key", help="the server's private key, PEM")
    serve.set_defaults(run=_serve)

    gen = sub.add_parser("generate", help="stream a prompt's continuation from a running server")
    gen.add_argument("prompt", nargs="?", default="", help="the prompt text (empty: continue --session)")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--session", help="run as the next turn of this session (created when new)")
    gen.add_argument("--token", help="bearer token (default: $STATEMESH_TOKEN)")
    gen.add_argument("--tls-ca", help="a PEM file of the CA that signed the server's certificate (TLS)")
    gen.set_defaults(run=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
