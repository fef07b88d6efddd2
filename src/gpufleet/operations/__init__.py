"""pyinfra operations for GPU hosts: NVIDIA driver check and toolkit, docker, models, vLLM."""
