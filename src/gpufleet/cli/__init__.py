"""The ``gpufleet`` command."""
