"""Generate the Python code of the gRPC contract: `make protos` (or `python tools/gen_protos.py`).

Runs grpc_tools' protoc on every .proto under protos/ and writes, next to each
(protos/statemesh/v1/statemesh.proto -> statemesh_pb2.py, statemesh_pb2.pyi, statemesh_pb2_grpc.py):
the messages, their type stubs and the service stubs and servicers.

protoc names a proto's module after its path under the include root (`statemesh.v1.statemesh_pb2`),
but the package installs protos/ as `statemesh.protos` (pyproject.toml), so the generated imports are
rewritten to `statemesh.protos.statemesh.v1`. The descriptors keep their proto names
(`statemesh/v1/statemesh.proto`, `statemesh.v1.Inference`), which is what reflection and grpcurl see.

The output depends only on the .proto files and the grpcio-tools version (pinned in pyproject.toml):
tests/cluster/test_protos.py regenerates into a temporary folder (`--out DIR`) and fails when the
committed files differ.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"  # the include root: proto paths and names are relative to it
IMPORT_PREFIX = "statemesh.protos"  # the import name of protos/ (pyproject.toml's package-dir)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto under the include root, as paths relative to it, sorted."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def generated_files(proto: Path) -> list[Path]:
    """The files generated from one proto (a path relative to the include root)."""
    stem = proto.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in GENERATED_SUFFIXES]


def _packages(protos: list[Path]) -> list[str]:
    """The dotted proto package folders that generated code may import from, e.g. `statemesh.v1`."""
    return sorted({".".join(p.parent.parts) for p in protos if p.parent.parts})


def fix_imports(text: str, packages: list[str]) -> str:
    """Rewrite `from statemesh.v1 import x_pb2` and `import statemesh.v1.x_pb2` so they import
    through the installed package (`statemesh.protos.statemesh.v1`), and the module name the
    message classes are built under (their `__module__`, which pickle follows) to match. Imports
    of other modules (google.protobuf, grpc) are left alone."""
    for package in packages:
        dotted = re.escape(package)
        text = re.sub(rf"^from {dotted} import ", f"from {IMPORT_PREFIX}.{package} import ", text, flags=re.M)
        text = re.sub(rf"^import {dotted}\.", f"import {IMPORT_PREFIX}.{package}.", text, flags=re.M)
        text = re.sub(
            rf"^(_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')({dotted}\.)",
            rf"\g<1>{IMPORT_PREFIX}.\g<2>",
            text,
            flags=re.M,
        )
    return text


def run_protoc(proto_root: Path, out: Path, protos: list[Path]) -> None:
    """Run grpc_tools' protoc (in this process) on `protos`, writing into `out`."""
    from grpc_tools import protoc  # a test/dev dependency only: the service imports the generated code

    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p) for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed (exit status {rc}) on {', '.join(map(str, protos))}")


def generate(out: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the code of every proto under `proto_root` into `out` (the same layout: a proto's
    files land in its folder); returns the written files, relative to `out`."""
    protos = proto_files(proto_root)
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    packages = _packages(protos)
    written = []
    # protoc writes into a scratch folder first, so a failed run leaves `out` untouched.
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as scratch:
        run_protoc(proto_root, Path(scratch), protos)
        for proto in protos:
            for rel in generated_files(proto):
                text = fix_imports((Path(scratch) / rel).read_text(encoding="utf-8"), packages)
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8", newline="\n")
                written.append(rel)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="where to write (default: protos/, in place)")
    args = parser.parse_args(argv)
    for rel in generate(args.out):
        print(args.out / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
