# Strobe agent image: Debian bookworm, Debian's bcc, the agent in /opt/strobe/.venv.
#
#   podman build -t strobe .        (or scripts/build-image.sh, which can also make the base)
#
# Run it as docs/deploy.md shows (and says why): the host's PID and UTS namespaces (the `node`
# label is the host's name), only the capabilities tests/deploy/test_image.py runs with,
# seccomp unconfined, a read-only root, ulimits runc can set without CAP_SYS_RESOURCE, and
# the host's kernel headers and cgroup tree mounted read-only:
#   mkdir -p /var/lib/strobe
#   podman run -d --name strobe --pid=host --uts=host \
#     --cap-drop=all --cap-add=BPF,PERFMON,SYS_PTRACE,CHECKPOINT_RESTORE,DAC_READ_SEARCH,SYSLOG \
#     --security-opt seccomp=unconfined --read-only \
#     --ulimit nofile=20000:20000 --ulimit nproc=20000:20000 \
#     -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro -v /sys/fs/cgroup:/sys/fs/cgroup:ro \
#     -v /var/lib/strobe:/var/lib/strobe \
#     localhost/strobe:latest run

# Any Debian 12 root file system; scripts/build-image.sh --local-base makes one with debootstrap.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1

# Python 3.11 and Debian's bcc (python3-bpfcc is pure Python over libbcc; PyPI's "bcc" is an
# unrelated project). ca-certificates for pip and for remote stores over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc libbpfcc ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# Fallback kernel headers, used when the host's /lib/modules and /usr/src are not mounted.
# Only the two header packages are unpacked: their package dependencies (gcc-12, kbuild, about
# 150 MB) build modules, which bcc does not need. The agent merges -common and -amd64 itself.
RUN apt-get update \
 && version=$(apt-cache depends linux-headers-amd64 | sed -n 's/.*Depends: linux-headers-\(.*\)-amd64$/\1/p' | head -n1) \
 && test -n "$version" \
 && cd /tmp && apt-get download "linux-headers-${version}-amd64" "linux-headers-${version}-common" \
 && for deb in /tmp/linux-headers-*.deb; do dpkg-deb -x "$deb" /tmp/headers; done \
 && mv /tmp/headers/usr/src/linux-headers-* /usr/src/ \
 && rm -rf /tmp/*.deb /tmp/headers /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && test -f "/usr/src/linux-headers-${version}-common/include/linux/kconfig.h"

# The agent, as a package, in a venv that reaches Debian's bcc (and only it) through a .pth,
# as scripts/setup.sh does for a checkout. /opt/strobe is also the systemd unit's install path.
COPY . /tmp/src
# An optional build secret "ca_bundle" is trusted by pip (a TLS-intercepting proxy's CA):
#   podman build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt .
RUN --mount=type=secret,id=ca_bundle \
    set -e; \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    python3 -m venv /opt/strobe/.venv; \
    site=$(/opt/strobe/.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    mkdir -p "$site/_strobe_system"; \
    ln -s /usr/lib/python3/dist-packages/bcc "$site/_strobe_system/bcc"; \
    echo "$site/_strobe_system" > "$site/strobe_debian_bcc.pth"; \
    # package-data ships agent/bpf/*.c; in a checkout the BPF source lives at bpf/.
    if [ -d /tmp/src/bpf ] && [ ! -d /tmp/src/agent/bpf ]; then cp -r /tmp/src/bpf /tmp/src/agent/bpf; fi; \
    /opt/strobe/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -q /tmp/src; \
    # The installer is not needed at run time (23 MB).
    /opt/strobe/.venv/bin/python -m pip uninstall -y -q pip setuptools; \
    rm -rf /tmp/src; \
    ln -s /opt/strobe/.venv/bin/strobe /usr/local/bin/strobe; \
    /opt/strobe/.venv/bin/python -c 'import bcc, agent.commands.cli'; \
    strobe --version

# Root, but the runtime grants only the capabilities listed in docs/deploy.md.
USER 0
VOLUME ["/var/lib/strobe", "/var/cache/strobe"]
EXPOSE 7071
ENTRYPOINT ["/opt/strobe/.venv/bin/strobe"]
CMD ["run"]
