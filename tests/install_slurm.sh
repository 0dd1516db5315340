#!/usr/bin/env bash
# Installs Debian's SLURM and munge for the tests that start a real one-node cluster (tests/slurm_cluster.py).
# A no-op when they are installed, when not root, or without apt-get: those tests then skip, saying why.
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge)
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then exit 0; fi
installed=$(dpkg-query -W -f='${db:Status-Status}\n' "${packages[@]}" 2>/dev/null | grep -cx installed || true)
if [[ $installed -eq ${#packages[@]} ]]; then exit 0; fi
# The packages' services must not start: the tests run their own daemons with their own configuration.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
