"""statemesh.cluster: the gRPC coordinator, routing, sessions, migration, Ray bootstrap, client and CLI.
Depends on statemesh.worker and statemesh.memory (DESIGN.md)."""

import os

# Ray reads this when it is imported, before anything here can pass it an address: without it even
# a local cluster binds the machine's outward address (ENVIRONMENT.md). The service stays on
# loopback unless the operator's environment says otherwise.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# isort: split

from statemesh.cluster.client import AsyncClient, Client, Completion, StatemeshError

__all__ = ["AsyncClient", "Client", "Completion", "StatemeshError"]
