"""Droplets tagged for the service (GPUFLEET_TAG, default llama3) from the DigitalOcean API.

    pyinfra inventories/do.py deploys/llama3.py

Groups: the tag (e.g. ``llama3``), ``gpu`` and, from this file's name, ``do``. Environment and
defaults: see ``gpufleet/inventory.py``. pyinfra executes this file and treats every public
module-level list/tuple as a group, so helpers here start with ``_``.
"""

from gpufleet.clients import do_inventory as _inventory

try:
    _groups = _inventory.load_do_inventory()
except _inventory.InventoryError as _error:
    # Re-raised without the library's frames so pyinfra names this file in its one-line error.
    raise _error.with_traceback(None) from None

globals().update(_groups)
