"""The gpufleet lab: local stand-ins for GPU droplets and the services around them (tests only)."""
