#!/usr/bin/env bash
# Make a fresh Debian 12 host ready for Strobe: system packages (bcc, kernel
# headers, test tools) and a venv in .venv that reaches Debian's bcc.
# Idempotent and quiet when there is nothing to do.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  bpfcc-tools python3-bpfcc libbpfcc linux-headers-amd64   # BPF toolchain + headers
  python3-venv gcc g++ make binutils                       # venv + test binaries
  elfutils debuginfod libc6-dbg                            # symbol tests
  golang-go golang-github-google-pprof-dev                 # upstream pprof tool
  prometheus                                               # metrics test
  openssl                                                  # remote-sink TLS test CA
  systemd                                                  # systemd-analyze verify
  podman buildah runc debootstrap                          # container image test
  linux-perf                                               # benchmarks: perf record next to ours
  rustc                                                    # Rust v0 demangling test (real symbols)
  mold                                                     # unwind: mold's segment layout
  chromium                                                 # flame graph tests in a browser
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=/usr/bin/python3   # Debian's bcc is built for this interpreter
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# Reach Debian's bcc (and only it) from the venv: PyPI's "bcc" is another project.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/_strobe_system"
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/_strobe_system/bcc"
echo "$site/_strobe_system" > "$site/strobe_debian_bcc.pth"

stamp=.venv/.strobe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi

# Upstream pprof, built offline from Debian's Go sources (Debian's `go tool pprof`
# cannot symbolize C binaries; tests use this one).
if [ ! -x .venv/bin/pprof ]; then
  echo "setup: building pprof"
  GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS=-mod=mod \
    GOCACHE="$PWD/.venv/.gocache" go build -o .venv/bin/pprof github.com/google/pprof
fi
