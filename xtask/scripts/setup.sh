#!/usr/bin/env bash
# Idempotent set-up of everything a fresh Debian machine needs to build and test mesh:
# the Debian Rust toolchain that can target bpfel-unknown-none, a bpf-linker built against
# the same libLLVM, and the tools the tests and benchmarks drive. Quick when all is present.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (apt-get, bpffs and network namespaces need it)" >&2
  exit 1
fi

APT=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
PKGS=(rustc-web cargo-web rust-web-src bpftool iproute2 iputils-ping wrk iperf3 nghttp2-client curl tcpdump nghttp2-server python3 openssl nginx socat nftables)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${APT[@]}" update >/dev/null
  "${APT[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
  # The bench starts its own nginx inside its pods; the package's host service is not wanted.
  if [[ " ${missing[*]} " == *" nginx "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
fi

# The LLVM major of Debian's rustc decides which libLLVM bpf-linker must link.
llvm_major=$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ -z "$llvm_major" ]; then
  echo "setup: cannot read the LLVM version from /usr/bin/rustc -vV" >&2
  exit 1
fi
if ! dpkg-query -W -f='${Status}' "llvm-${llvm_major}-dev" 2>/dev/null | grep -q "install ok installed"; then
  log "installing llvm-${llvm_major}-dev"
  export DEBIAN_FRONTEND=noninteractive
  "${APT[@]}" update >/dev/null
  "${APT[@]}" install --no-install-recommends "llvm-${llvm_major}-dev" >/dev/null
fi

if ! rustup toolchain list | grep -q '^debian-bpf'; then
  log "linking rustup toolchain debian-bpf -> /usr"
  rustup toolchain link debian-bpf /usr
fi

linker=$(command -v bpf-linker || true)
if [ -z "$linker" ] || ! ldd "$linker" | grep -q "libLLVM.so.${llvm_major}"; then
  log "building bpf-linker for LLVM ${llvm_major}"
  LLVM_PREFIX="/usr/lib/llvm-${llvm_major}" cargo install --locked --force bpf-linker@0.13.0 \
    --no-default-features --features "llvm-${llvm_major}" >/dev/null
fi

# MESH_SETUP_BUILD_ONLY=1 (the image builder, daemonset/Dockerfile): the build toolchain
# only; no kernel mounts (a container build cannot make them), no test tools.
if [ -n "${MESH_SETUP_BUILD_ONLY:-}" ]; then
  log "ready to build (LLVM ${llvm_major})"
  exit 0
fi

# Kernel facilities the e2e tests and the agent use.
if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# The e2e tests run their own Prometheus (config, TSDB and port of their own), so the package
# is wanted for its binary only: its service must not start. invoke-rc.d asks policy-rc.d
# first, and 101 means "not allowed"; a policy-rc.d already there (container images ship one)
# is the machine's own and stays as it is.
if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "install ok installed"; then
  log "installing prometheus (the binary; its service stays stopped)"
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${APT[@]}" update >/dev/null
  "${APT[@]}" install --no-install-recommends prometheus >/dev/null
  if [ -n "$own_policy" ]; then
    rm -f "$policy"
    trap - EXIT
  fi
  # The postinst enables the unit; where systemd runs, keep it from starting at boot too.
  if [ -d /run/systemd/system ]; then
    systemctl disable prometheus >/dev/null 2>&1 || true
  fi
fi
if ! prometheus --version >/dev/null 2>&1; then
  echo "setup: the prometheus package is installed but 'prometheus --version' fails" >&2
  exit 1
fi

# Manifest validation (cargo xtask test): the Kubernetes JSON schemas of every version,
# pinned, in the python3 that is on PATH.
KUBERNETES_VALIDATE_VERSION=1.37.0
if ! python3 -c "import kubernetes_validate, sys; sys.exit(kubernetes_validate.__version__ != '${KUBERNETES_VALIDATE_VERSION}')" 2>/dev/null; then
  log "installing kubernetes-validate ${KUBERNETES_VALIDATE_VERSION}"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    "${APT[@]}" update >/dev/null
    "${APT[@]}" install --no-install-recommends python3-pip >/dev/null
  fi
  pip_install=(python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}")
  # A Debian python3 refuses system-wide installs (PEP 668) unless told otherwise.
  "${pip_install[@]}" 2>/dev/null || "${pip_install[@]}" --break-system-packages
fi
log "ready (LLVM ${llvm_major})"
