"""The documentation keeps up with the code it describes (issue 16): every service and RPC of the
protos has its section in docs/grpc-api.md (and no section names an RPC that is gone), the README
links every page of docs/, and every relative link of the README and the docs pages leads to a file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from statemesh.protos.statemesh.v1 import statemesh_pb2

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GRPC_DOC = DOCS / "grpc-api.md"
README = ROOT / "README.md"

# An RPC's section is a heading that names it as `Service/Rpc`, e.g. "### `Sessions/Get`": a bare
# "Get" or "List" would be found in any page, so the name alone proves nothing.
RPC_HEADING = re.compile(r"^#{2,4} .*?`(\w+)/(\w+)`", re.MULTILINE)
SERVICE_HEADING = re.compile(r"^## `(\w+)`", re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def proto_services(text: str) -> dict[str, list[str]]:
    """{service name: its RPC names, in order} of one .proto file's text. Comments are dropped first
    (a comment may say "rpc" or "service"); a service's body runs to its matching closing brace (an
    RPC may have an options body of its own)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    text = re.sub(r"//[^\n]*", "", text)
    services: dict[str, list[str]] = {}
    for match in re.finditer(r"\bservice\s+(\w+)\s*\{", text):
        depth, end = 1, match.end()
        while depth:
            if end >= len(text):
                raise ValueError(f"service {match.group(1)}: no closing brace")
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        services[match.group(1)] = re.findall(r"\brpc\s+(\w+)\s*\(", text[match.end() : end])
    return services


def all_proto_rpcs() -> dict[str, list[str]]:
    services: dict[str, list[str]] = {}
    for path in sorted((ROOT / "protos").rglob("*.proto")):
        for name, rpcs in proto_services(path.read_text()).items():
            assert name not in services, f"service {name} is defined twice ({path})"
            services[name] = rpcs
    return services


def relative_links(page: Path) -> list[str]:
    """The link targets of a markdown page that point into the repository (not URLs, not anchors
    of the page itself), outside code blocks."""
    text = FENCE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


# ---- the parser itself ------------------------------------------------------------------------------


def test_the_proto_parser_finds_services_and_rpcs_and_skips_comments() -> None:
    text = """
    // service Ghost { rpc Nope(A) returns (B); }
    /* rpc AlsoNot(A) returns (B); */
    service Alpha {
      // Runs. rpc InComment(X) returns (Y);
      rpc Run(RunRequest) returns (stream RunResponse);
      rpc Stop (StopRequest) returns (StopResponse) { option deprecated = true; }
    }
    message RunRequest { string rpc_name = 1; }
    service Beta { rpc Ping(PingRequest) returns (PingResponse); }
    """
    assert proto_services(text) == {"Alpha": ["Run", "Stop"], "Beta": ["Ping"]}


def test_the_parser_reads_the_real_protos_as_the_generated_code_does() -> None:
    """What the .proto parser finds matches the descriptor protoc built, so a parser that missed
    something cannot make the documentation check below pass by finding nothing."""
    parsed = all_proto_rpcs()
    for name, service in statemesh_pb2.DESCRIPTOR.services_by_name.items():
        assert parsed.get(name) == [m.name for m in service.methods], name


# ---- the gRPC page ----------------------------------------------------------------------------------


def test_every_service_and_rpc_of_the_protos_has_its_section_in_the_grpc_page() -> None:
    doc = GRPC_DOC.read_text()
    documented = set(RPC_HEADING.findall(doc))
    services = set(SERVICE_HEADING.findall(doc))
    missing = [f"{s}/{r}" for s, rpcs in all_proto_rpcs().items() for r in rpcs if (s, r) not in documented]
    assert not missing, f"{GRPC_DOC.name} has no section (a heading naming `Service/Rpc`) for: {missing}"
    absent = sorted(set(all_proto_rpcs()) - services)
    assert not absent, f"{GRPC_DOC.name} has no section (a heading `## \\`Service\\``) for the services {absent}"


def test_the_grpc_page_names_no_rpc_that_the_protos_lack() -> None:
    rpcs = {(s, r) for s, names in all_proto_rpcs().items() for r in names}
    stale = sorted(f"{s}/{r}" for s, r in RPC_HEADING.findall(GRPC_DOC.read_text()) if (s, r) not in rpcs)
    assert not stale, f"{GRPC_DOC.name} has sections for RPCs that no .proto defines: {stale}"


# ---- links ------------------------------------------------------------------------------------------


def test_the_readme_links_every_docs_page() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for target in relative_links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "no pages in docs/"
    unlinked = [p.name for p in pages if p.resolve() not in linked]
    assert not unlinked, f"README.md links no docs page named {unlinked}; add them to its Documentation section"


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page: Path) -> None:
    broken = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"
