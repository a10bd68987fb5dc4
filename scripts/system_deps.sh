#!/usr/bin/env bash
# Install the Debian packages the project needs (as root), or say what to install.
#   scripts/system_deps.sh            Fashion-MNIST IDX files
#   scripts/system_deps.sh slurm      + Slurm and munge (for the local test cluster)
set -euo pipefail
pkgs=(dataset-fashion-mnist)
[[ "${1:-}" == "slurm" ]] && pkgs+=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "error: missing Debian packages: ${missing[*]}" >&2
  echo "       run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  echo "       (or point data.source.root at a folder holding the Fashion-MNIST IDX files)" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
