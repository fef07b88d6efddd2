#!/bin/sh
# Install the Debian packages the lab needs that this machine lacks (the list:
# src/gpufleet_lab/host_tools.txt). Run by `make demo` and .ci/run. Without root, it names what
# is missing and how to install it, and fails.
set -eu
list="$(dirname "$0")/src/gpufleet_lab/host_tools.txt"
need=""
while read -r what package; do
  case "$what" in ''|'#'*) continue ;; esac
  case "$what" in
    /*) [ -e "$what" ] && continue ;;
    python3:*) python3 -c "import venv, ${what#python3:}" 2>/dev/null && continue ;;
    *) command -v "$what" >/dev/null 2>&1 && continue ;;
  esac
  case " $need " in *" $package "*) ;; *) need="$need $package" ;; esac
done < "$list"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "the lab needs these Debian packages:$need (run: apt-get install$need, as root)" >&2
  exit 1
fi
echo "installing what the lab needs:$need" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086 (one word per package)
apt-get install -y -qq --no-install-recommends $need >/dev/null
# haproxy: the lab runs its own (one per emulated load balancer, cloudnet.py); the Debian
# service must never start on its own
case " $need " in *" haproxy "*)
  systemctl disable haproxy >/dev/null 2>&1 || true
  if [ -d /run/systemd/system ]; then systemctl stop haproxy >/dev/null 2>&1 || true; fi ;;
esac
