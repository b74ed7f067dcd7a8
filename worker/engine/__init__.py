"""The single-process engine: continuous batching over one `Memory`, sampling, stop matching, the
prefix cache, sessions, a sequence's portable state, and the thread a shard actor runs it on."""
