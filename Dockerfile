# The sidelane image: the node agent and install-cni (/usr/local/bin/sidelane)
# and the chained CNI plugin that install-cni copies onto the node
# (/usr/local/bin/sidelane-cni), on Debian 12 with iptables and nftables
# (the iptables datapath and its cleanup).
#
# The binaries are static and built outside the image, so the build needs no
# Go toolchain image:
#
#   make build && docker build -t ghcr.io/sidelane/sidelane:0.1.0 \
#     --build-arg VERSION=$(git describe --tags --always --dirty) .
#
# `make image` builds this same file without a Docker daemon (podman, with
# a debian:bookworm-slim made from Debian's packages by mmdebstrap).
FROM docker.io/library/debian:bookworm-slim

# iptables and nftables: the slim image has neither. The base `make image`
# imports already holds both, so this step then changes nothing and needs
# no network.
RUN if ! command -v iptables >/dev/null || ! command -v nft >/dev/null; then \
      apt-get update && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables nftables && \
      rm -rf /var/lib/apt/lists/*; \
    fi

COPY bin/sidelane bin/sidelane-cni /usr/local/bin/

ARG VERSION=dev
LABEL org.opencontainers.image.title="sidelane" \
      org.opencontainers.image.description="Chained CNI plugin and node agent that captures Istio traffic with eBPF" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/sidelane/sidelane"

ENTRYPOINT ["/usr/local/bin/sidelane"]
CMD ["version"]
