#!/usr/bin/env bash
# Install the Debian packages the project needs (as root), or say what to install.
#   scripts/system_deps.sh          Fashion-MNIST IDX files (make run): a missing one is an error
#   scripts/system_deps.sh test     + Slurm and munge for the local test cluster (make test), best
#                                   effort: without root, or when apt-get fails, say which tests will
#                                   be skipped and exit 0, so every other test still runs
#   (`slurm` is accepted for `test`.)
set -euo pipefail
mode="${1:-run}"
case "$mode" in
  run) ;;
  test | slurm) mode=test ;;
  *) echo "usage: $0 [test]" >&2; exit 2 ;;
esac
pkgs=(dataset-fashion-mnist)
[[ "$mode" == test ]] && pkgs+=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0

skipped() {  # test mode: what the missing packages cost, then carry on
  echo "note: missing Debian packages: ${missing[*]} ($1)." >&2
  echo "      Tests that need them are skipped and say why (Fashion-MNIST: the data tests; slurm*/munge:" >&2
  echo "      the tests marked slurm). To run them all: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 0
}

if [[ $(id -u) -ne 0 ]]; then
  [[ "$mode" == test ]] && skipped "not root, so not installed"
  echo "error: missing Debian packages: ${missing[*]}" >&2
  echo "       run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  echo "       (or point data.source.root at a folder holding the Fashion-MNIST IDX files)" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
  [[ "$mode" == test ]] && skipped "apt-get failed"
  echo "error: apt-get install ${missing[*]} failed" >&2
  exit 1
fi
