#!/usr/bin/env bash
# Build the Strobe agent image with podman (Dockerfile at the repository root).
#
#   scripts/build-image.sh [--local-base] [--tag IMAGE]
#
# --local-base  make the Debian bookworm base image locally (debootstrap --variant=minbase,
#               trimmed like debian:bookworm-slim, then `podman import`), for machines that
#               reach no image registry. Made once per machine: reused while the image
#               localhost/strobe-base:bookworm-slim with the current recipe label exists.
#               Without it the base is debian:bookworm-slim from a registry; when that cannot
#               be pulled the script stops and suggests --local-base.
# --tag IMAGE   name of the agent image (default localhost/strobe:latest).
#
# podman reads $CONTAINERS_CONF if set (tests/deploy/containers.conf selects runc and sane
# ulimits on hosts where crun fails). The build host's CA bundle is handed to pip as a build
# secret, so a TLS-intercepting proxy the host trusts also works inside the build.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=localhost/strobe-base:bookworm-slim
REGISTRY_BASE=debian:bookworm-slim   # the Dockerfile's default BASE_IMAGE
BASE_RECIPE=1   # bump when make_local_base changes, so cached bases are rebuilt
# The Debian mirror this host's apt already uses (deb822 or one-line sources), unless given.
host_mirror() {
  local suffix=$1
  grep -hoE "https?://[^ ]+/debian${suffix}/?( |$)" /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list 2>/dev/null | head -1 | tr -d ' ' || true
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror "")}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(host_mirror "-security")}
SECURITY_MIRROR=${SECURITY_MIRROR:-$MIRROR}
tag=localhost/strobe:latest
tag_given=
local_base=0
while (($#)); do
  case "$1" in
    --local-base) local_base=1 ;;
    --tag) tag=$2; tag_given=1; shift ;;
    *) echo "usage: $0 [--local-base] [--tag IMAGE]" >&2; exit 2 ;;
  esac
  shift
done

base_is_current() {
  [ "$(podman image inspect --format '{{ index .Labels "strobe.base.recipe" }}' "$BASE_IMAGE" 2>/dev/null)" = "$BASE_RECIPE" ]
}

make_local_base() {
  local root
  if [ -z "$MIRROR" ]; then
    echo "build-image: no Debian mirror in /etc/apt sources; set DEBIAN_MIRROR" >&2
    return 1
  fi
  root=$(mktemp -d /var/tmp/strobe-base.XXXXXX)
  trap 'rm -rf "$root"' RETURN
  echo "build-image: debootstrap bookworm (minbase) into $root"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; return 1; }
  rm -f "$root.log"
  # Like debian:bookworm-slim: updates and security suites, no docs/man/locales, no .deb cache.
  cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/strobe-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  echo 'APT::Keep-Downloaded-Packages "false";' >"$root/etc/apt/apt.conf.d/strobe-slim"
  find "$root/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/{man,info,locale}/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
  tar --numeric-owner -C "$root" -c . | podman import \
    --change 'CMD ["/bin/bash"]' --change "LABEL strobe.base.recipe=$BASE_RECIPE" \
    - "$BASE_IMAGE" >/dev/null
}

build_args=()
if ((local_base)); then
  # One base per machine, even when several builds start at once.
  exec 9>/var/lock/strobe-image-base.lock
  flock 9
  if ! base_is_current; then
    start=$SECONDS
    make_local_base
    echo "build-image: made $BASE_IMAGE in $((SECONDS - start)) s"
  fi
  flock -u 9
  build_args+=(--pull=never --build-arg "BASE_IMAGE=$BASE_IMAGE")
elif ! podman image exists "$REGISTRY_BASE"; then
  # What `podman build` would pull first; failing here can name the way out.
  if ! podman pull "$REGISTRY_BASE" >&2; then
    echo "build-image: cannot pull the base image $REGISTRY_BASE (no image registry reachable?)." >&2
    echo "build-image: make the base locally instead (debootstrap from this host's Debian mirror):" >&2
    echo "  $0 --local-base${tag_given:+ --tag $tag}" >&2
    exit 1
  fi
fi
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
  build_args+=(--secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt)
fi

previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
start=$SECONDS
podman build --layers -t "$tag" -f Dockerfile "${build_args[@]}" .
# The image this tag named before is garbage now (its cached layers stay for the next build).
current=$(podman image inspect --format '{{.Id}}' "$tag")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
echo "build-image: built $tag in $((SECONDS - start)) s," \
  "$(podman image inspect --format '{{.Size}}' "$tag") bytes"
