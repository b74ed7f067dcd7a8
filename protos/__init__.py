"""statemesh.protos: the .proto sources of the service and the code generated from them."""
