"""pyinfra facts for GPU hosts: NVIDIA driver and GPUs, docker engine, vLLM endpoint."""
