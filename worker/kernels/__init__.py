"""The numerics the architectures are built from: norms and products (`nn`), attention over the
memory's cells, RoPE, and the host's threads and small-product kernels that a decode step runs on."""
