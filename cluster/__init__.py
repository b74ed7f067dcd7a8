"""statemesh.cluster: the gRPC coordinator, routing, sessions, migration, Ray bootstrap, client and CLI.
Depends on statemesh.worker and statemesh.memory (DESIGN.md)."""
