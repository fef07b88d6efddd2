"""Names and paths gpufleet uses on hosts, each derived in this one place.

    /etc/systemd/system/gpufleet-<service>.service     the unit
    gpufleet-<service>                                 its container
    /etc/gpufleet/<service>.env                        the server's env file (VLLM_API_KEY), 0600
    /etc/gpufleet/<service>.hf-token                   the Hub token for the staging, 0600
    /etc/gpufleet/<service>.front-keys.conf            the front's key check (nginx), 0600
    /etc/gpufleet/<service>.tls.{crt,key}              the front's certificate and key (TLS)
    /etc/nginx/conf.d/gpufleet-<service>.conf          the front: nginx on the public port
    /var/lib/gpufleet/<service>/                       releases, run lock, audit log
    /usr/local/lib/gpufleet/                           gpufleet's host scripts
"""

from __future__ import annotations

UNIT_DIR = "/etc/systemd/system"
SECRETS_DIR = "/etc/gpufleet"
STATE_ROOT = "/var/lib/gpufleet"
SCRIPT_DIR = "/usr/local/lib/gpufleet"

VERIFY_SCRIPT = f"{SCRIPT_DIR}/verify_endpoint.py"
STAGE_SCRIPT = f"{SCRIPT_DIR}/stage_weights.py"
RESTART_SCRIPT = f"{SCRIPT_DIR}/docker_restart.py"
MANIFEST_DIR = f"{SCRIPT_DIR}/manifests"
WEIGHT_PEER_PORT = 8790  # hosts hand each other staged weights on their private addresses


def unit_name(service: str) -> str:
    return f"gpufleet-{service}.service"


def unit_path(service: str) -> str:
    return f"{UNIT_DIR}/{unit_name(service)}"


def container_name(service: str) -> str:
    return f"gpufleet-{service}"


def env_file(service: str) -> str:
    """The server's env file: the API key only (the entrypoint sources it)."""
    return f"{SECRETS_DIR}/{service}.env"


def hf_token_file(service: str) -> str:
    """The Hub token, for the weight staging only (never the server's)."""
    return f"{SECRETS_DIR}/{service}.hf-token"


def front_keys_file(service: str) -> str:
    """The front's key check, holding the API key, root-only (nginx's master process reads it
    as root; its workers never do)."""
    return f"{SECRETS_DIR}/{service}.front-keys.conf"


def front_site(service: str) -> str:
    """The front's nginx server (no secret in it; Debian's nginx.conf includes conf.d)."""
    return f"/etc/nginx/conf.d/gpufleet-{service}.conf"


def front_url_file(service: str) -> str:
    """Where the host's own checks reach its front (``http://127.0.0.1:8000``; https with TLS):
    written with the front, read by the health checks of a rollback, a rebuild and status."""
    return f"{service_dir(service)}/front.url"


def tls_certificate_file(service: str) -> str:
    return f"{SECRETS_DIR}/{service}.tls.crt"


def tls_key_file(service: str) -> str:
    return f"{SECRETS_DIR}/{service}.tls.key"


def secret_files(service: str) -> tuple[str, ...]:
    """Every file of the service that holds a secret (a golden snapshot removes them all)."""
    return (env_file(service), hf_token_file(service), front_keys_file(service),
            tls_key_file(service))


def weights_peer_file(commit: str) -> str:
    """Where a host finds the peer its weights come from, URL and token (the stager removes it)."""
    return f"{SECRETS_DIR}/weights-peer-{commit[:12]}.json"


WEIGHTS_PEER_FILES = f"{SECRETS_DIR}/weights-peer-*.json"  # a shell glob of them


def service_dir(service: str) -> str:
    return f"{STATE_ROOT}/{service}"


def releases_dir(service: str) -> str:
    return f"{service_dir(service)}/releases"


def release_dir(service: str, release_id: str) -> str:
    return f"{releases_dir(service)}/{release_id}"


def lock_path(service: str) -> str:
    """The run lock (``flock``) every deploy, rollout and rollback of the service takes."""
    return f"{service_dir(service)}/lock"


def lock_holder_path(service: str) -> str:
    return f"{service_dir(service)}/lock.holder.json"


def audit_log(service: str) -> str:
    return f"{service_dir(service)}/audit.log"


def manifest_path(model: str, commit: str) -> str:
    return f"{MANIFEST_DIR}/{model.replace('/', '--')}-{commit}.json"
