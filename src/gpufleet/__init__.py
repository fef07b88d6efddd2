"""gpufleet: pyinfra deploys, operations and facts that take GPU droplets from bare VM to a
verified vLLM endpoint, roll changes across a fleet and rebuild lost droplets."""

__version__ = "0.1.0"
