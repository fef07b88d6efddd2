"""The controller's clients: the Hugging Face Hub and the DigitalOcean API (and the inventory built from it)."""
