"""Jinja2 templates shipped inside the gpufleet wheel (as the package ``gpufleet.templates``)."""
