"""statemesh.v1: the gRPC contract (statemesh.proto, see API.md) and the code generated from it by `make protos`."""
