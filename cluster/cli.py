"""`statemesh`, the command line of API.md: `serve` runs the service; `generate` streams a prompt's
text from a running one; `batch` runs a file of prompts offline (cluster/batch.py).

    statemesh serve [--model PATH] [--replicas N] [--port P] ...
    statemesh generate "The capital of France is" --max-tokens 16 --temperature 0
    statemesh batch prompts.jsonl out.jsonl [--replicas N] [--address A]
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
            snapshot_dir=args.snapshot_dir, weights=args.weights,
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
    # Everything is stopped (run_service's teardown: the server, the workers, Ray). Leave without the
    # interpreter's own teardown, where the Ray core library's destructors have been seen to abort
    # the process (exit -6) on a loaded machine after a clean shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def _batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statemesh.cluster.batch import BatchConfig, main
    from statemesh.cluster.ray_cluster import RayOptions
    from statemesh.worker.loading.loader import default_model_path

    if args.model is not None and not os.path.exists(args.model):
        print(f"statemesh batch: --model {args.model}: no such file or folder; expected a GGUF file or a "
              "Hugging Face folder", file=sys.stderr)  # fmt: skip
        return 2
    model = os.path.abspath(args.model) if args.model else str(default_model_path())
    ray_address = args.ray_address or os.environ.get("RAY_ADDRESS") or None  # set by `ray job submit`
    try:
        engine = EngineConfig(n_ctx=args.n_ctx, n_seq_max=args.max_seqs)
        if args.replicas < 1 or (args.concurrency is not None and args.concurrency < 1):
            raise ValueError(f"--replicas and --concurrency must be 1 or more, got {args.replicas} and "
                             f"{args.concurrency}")  # fmt: skip
        tls_ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    except (ValueError, OSError) as e:
        print(f"statemesh batch: {e}", file=sys.stderr)
        return 2
    config = BatchConfig(
        input=Path(args.input), output=Path(args.output), model_path=model, replicas=args.replicas, engine=engine,
        ray=RayOptions(address=ray_address, num_cpus=args.num_cpus), address=args.address,
        token=args.token or os.environ.get("STATEMESH_TOKEN"), tls_ca=tls_ca, concurrency=args.concurrency,
    )  # fmt: skip
    return main(config)


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
        "--weights", choices=("f32", "q8", "q4"), default="f32",
        help="how the workers keep the large weight matrices: f32 (widened from the file), or packed from a GGUF "
        "file: q4 (its Q4_0/Q4_1 blocks as they are, the rest as q8) or q8 (int8 with a scale per 32); packed "
        "weights need numpy workers",
    )  # fmt: skip
    serve.add_argument(
        "--snapshot-dir",
        help="save each session's state here as its turns end (a file per session): sessions then survive a "
        "restart of the server on the same directory (default: kept in memory, lost with the server)",
    )
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

    batch = sub.add_parser(
        "batch", help="generate for every line of a JSONL file, offline, resumable",
        description="One JSON object a line in IN: the prompt as \"prompt\" (text), \"token_ids\" or chat "
        "\"messages\"; an optional \"id\" (default: the line number); sampling fields by their SamplingParams "
        "names (max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, "
        "frequency_penalty, seed, logprobs, stop, stop_token_ids, ignore_eos). One object a line out to OUT as "
        "each request finishes, in any order: id, text, token_ids, finish_reason, usage. Bad input lines (not "
        "JSON, no prompt, unknown field, bad sampling value, repeated id) stop the run before anything starts, "
        "each reported with its line number (exit 2). A line the model refuses (prompt longer than the context, "
        "token id outside the vocabulary, messages without a chat template) gets {\"id\", \"error\"} in OUT and "
        "the run goes on (exit 1). A rerun with the same OUT skips the ids it holds (delete error lines to "
        "retry them) and redoes a last line cut short. A progress bar on a terminal; one line of throughput "
        "on stderr at the end.",
    )  # fmt: skip
    batch.add_argument("input", metavar="IN.jsonl")
    batch.add_argument("output", metavar="OUT.jsonl")
    batch.add_argument("--model", help="a GGUF file or a Hugging Face folder (default: SmolLM2-135M-Instruct)")
    batch.add_argument("--replicas", type=int, default=1, help="replicas to start (not with --address)")
    batch.add_argument("--address", help="send to the server running here (host:port) instead of starting replicas")
    batch.add_argument(
        "--ray-address", help="start the replicas on this Ray cluster (default: $RAY_ADDRESS, which `ray job submit` "
        "sets; without it: an embedded local cluster on loopback)",
    )  # fmt: skip
    batch.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray cluster (default: the machine's)")
    batch.add_argument("--n-ctx", type=int, default=4096, help="token cells of each replica's KV cache")
    batch.add_argument("--max-seqs", type=int, default=32, help="sequences each replica runs at once")
    batch.add_argument("--concurrency", type=int, help="requests in flight (default: 2 x replicas x --max-seqs)")
    batch.add_argument("--token", help="with --address: bearer token (default: $STATEMESH_TOKEN)")
    batch.add_argument("--tls-ca", help="with --address: a PEM file of the CA that signed the server's certificate")
    batch.set_defaults(run=_batch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
