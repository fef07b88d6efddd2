"""Will it fit? The VRAM planner: a spec x a host's GPUs -> sizing and verdict."""
