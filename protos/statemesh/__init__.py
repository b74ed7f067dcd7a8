"""The statemesh proto package (statemesh/*.proto) and the code generated from it."""
