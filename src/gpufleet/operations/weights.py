"""Stage model weights on the host before the service (re)starts."""

from __future__ import annotations

import json
from io import StringIO
from typing import TYPE_CHECKING

from pyinfra import host
from pyinfra.api import FileUploadCommand, FunctionCommand, QuoteString, StringCommand, operation

from gpufleet.facts.weights import WeightsStaged
from gpufleet.model.names import MANIFEST_DIR, STAGE_SCRIPT, manifest_path, weights_peer_file

if TYPE_CHECKING:
    from gpufleet.deploy.weight_peers import Peer


@operation()
def weights_staged(
    model: str,
    commit: str,
    files: list[dict],
    endpoint: str,
    token_file: str | None = None,
    models_dir: str = "/opt/models",
    revision: str | None = None,
    peer: Peer | None = None,
):
    """
    Make sure ``model`` is on the host at ``commit``, in the Hugging Face cache layout under
    ``models_dir/hub``, so the container can run with ``HF_HUB_OFFLINE=1``. A completion marker
    makes a staged model a no-op without listing files; otherwise the host downloads what is
    missing (disk space checked first, resumable, sha256-verified), reading the token from the
    root-only token file. One staging per model at a time on the host (a second one waits, then
    resumes what the first left); the host script stops when this run's SSH connection is gone
    (the controller was killed), keeping what arrived for the next run; a full disk stops at
    once, without retries.

    + model: Hugging Face model id
    + commit: the 40-hex commit to stage
    + files: the files of that commit: ``[{"path", "size", "sha256"?}]`` (from gpufleet.clients.hub)
    + endpoint: the Hub's URL (``https://huggingface.co`` or HF_ENDPOINT)
    + token_file: the root-only file holding HF_TOKEN (None or a missing file: anonymous)
    + models_dir: the Hugging Face cache directory on the host
    + revision: the branch or tag the commit was resolved from (written to ``refs/``)
    + peer: a host that serves the files on its private address (``gpufleet.deploy.weight_peers``),
      asked first, file by file, the Hub serving what it cannot

    **Example:**

    .. code:: python

        models.weights_staged(
            name="Stage Llama 3 8B",
            model="meta-llama/Meta-Llama-3-8B-Instruct",
            commit="8afb486c1db24fe5011ec46dfbe5b5dccdb575c2",
            files=[{"path": "config.json", "size": 654}],
            endpoint="https://huggingface.co",
            token_file="/etc/gpufleet/llama3.hf-token",
        )
    """
    if host.get_fact(WeightsStaged, models_dir=models_dir, model=model, commit=commit):
        host.noop(f"{model}@{commit[:12]} is staged in {models_dir}")
        return
    manifest = {"model": model, "commit": commit, "revision": revision or commit,
                "files": [{k: f[k] for k in ("path", "size", "sha256", "blob_id")
                           if f.get(k) is not None}
                          for f in files]}
    path = manifest_path(model, commit)
    yield StringCommand("mkdir", "-p", QuoteString(MANIFEST_DIR))
    yield FileUploadCommand(StringIO(json.dumps(manifest, indent=1) + "\n"), path)
    token_args = ["--token-file", QuoteString(token_file)] if token_file else []
    peer_args = []
    if peer is not None:
        from gpufleet.deploy import weight_peers

        peer_path = weights_peer_file(commit)
        yield FunctionCommand(weight_peers.hand_over, (peer, peer_path), {})
        peer_args = ["--peer-file", QuoteString(peer_path)]
    yield StringCommand(
        "python3", STAGE_SCRIPT, "--manifest", QuoteString(path), "--endpoint",
        QuoteString(endpoint), *token_args, "--models-dir", QuoteString(models_dir), *peer_args,
    )
