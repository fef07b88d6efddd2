"""The pure model of a service: its spec, names, secrets, vLLM flags, GPUs, releases."""
