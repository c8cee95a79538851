#!/usr/bin/env bash
# Installs the system packages lazy-restore needs on a Debian bookworm machine:
#   - CRIU 4.1 from Debian trixie (bookworm's 3.17 fails here with
#     "vdso: Unexpected rt vDSO area bounds"), pinned at low priority so nothing
#     else is pulled from trixie;
#   - libclang (the userfaultfd crates run bindgen), a C compiler for the workloads;
#   - python3-pycriu's `crit`, used by tests to cross-check our image reader.
# Idempotent: a second run does nothing but check.
set -euo pipefail

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: must run as root (apt-get, /etc/apt)" >&2
    exit 1
  fi
}

criu_ok() {
  command -v criu >/dev/null 2>&1 || return 1
  local v
  v=$(criu --version 2>/dev/null | sed -n 's/^Version: *//p')
  case "$v" in 4.*|5.*) return 0 ;; *) return 1 ;; esac
}

have_pkgs() {
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 1
  done
}

need_root
export DEBIAN_FRONTEND=noninteractive

base_pkgs=(libclang-dev clang gcc make pkg-config iproute2 util-linux)
if criu_ok && have_pkgs "${base_pkgs[@]}" && command -v crit >/dev/null 2>&1; then
  echo "install-deps: already installed: $(criu --version | head -1), libclang, crit"
  exit 0
fi

src=/etc/apt/sources.list.d/debian.sources
trixie_src=/etc/apt/sources.list.d/lazy-restore-trixie.sources
if [ ! -f "$trixie_src" ]; then
  # First stanza of the machine's own sources (its mirror and keyring), suite swapped to trixie.
  awk 'BEGIN{RS=""; ORS="\n"} NR==1{print; exit}' "$src" \
    | sed -E 's/^Suites:.*/Suites: trixie/' >"$trixie_src"
fi
cat >/etc/apt/preferences.d/lazy-restore-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN

apt-get update -qq
apt-get install -y -qq "${base_pkgs[@]}" >/dev/null
apt-get install -y -qq -t trixie criu python3-pycriu >/dev/null || \
  apt-get install -y -qq -t trixie criu >/dev/null

criu_ok || { echo "install-deps: criu 4.x did not install" >&2; exit 1; }
echo "install-deps: $(criu --version | head -1)"
criu check >/dev/null 2>&1 && echo "install-deps: criu check: Looks good" || echo "install-deps: warning: 'criu check' is not clean on this kernel" >&2
