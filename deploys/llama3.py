"""Serve Llama 3 8B Instruct with vLLM on every droplet of the inventory.

    pyinfra inventories/do.py deploys/llama3.py [--data quantization=fp16]

The service is described in llama3.yaml next to this file.
"""

from pathlib import Path

from gpufleet.deploy.service import deploy_service_from_file

deploy_service_from_file(Path(__file__).with_suffix(".yaml"))
