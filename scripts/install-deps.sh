#!/usr/bin/env bash
# install-deps.sh: the Debian packages loupe builds against. Called by `make deps`
# (and so by `make test`, `make demo` and .ci/run). Installs with apt-get when run as
# root; otherwise prints the exact command and stops.
set -euo pipefail
pkgs=(build-essential pkg-config libopenblas-dev libcjson-dev libcriterion-dev libpcre2-dev libutf8proc-dev libyaml-dev python3 python3-pip)
# optional: the dashboard page's render test uses a headless chromium (it skips without one);
# OpenMPI runs loupe over several processes (tensor parallelism; without it the build is
# single-process and the mpirun tests skip); python3-jsonschema validates loupe's graph JSON
# against Neuronpedia's schema (test_graph_schema skips without it); strace shows a test what
# programs `loupe train-sae` starts (test_cli's check of it skips without it); installed when
# we can, never required
optional=(chromium openmpi-bin libopenmpi-dev python3-jsonschema strace)
missing=()
for p in "${pkgs[@]}" "${optional[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "$(id -u)" -ne 0 ]; then
    for p in "${optional[@]}"; do missing=("${missing[@]/$p}"); done
    read -r -a missing <<<"${missing[*]}"
fi
[ ${#missing[@]} -eq 0 ] && exit 0
cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    echo "loupe: missing system packages: ${missing[*]}" >&2
    echo "loupe: run as root:  $cmd" >&2
    exit 1
fi
echo "loupe: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
