#!/usr/bin/env bash
# Builds the root Dockerfile into an image archive without a Docker daemon:
#
#   hack/build-image.sh            (make image; needs bin/ from make build)
#
# 1. a debian:bookworm-slim with iptables and nftables, made from Debian's
#    packages by mmdebstrap (~45-90 s, cached in $SIDELANE_CACHE/image),
# 2. `podman import` of it under the name the Dockerfile's FROM uses,
# 3. `podman build` of the Dockerfile, tagged $IMAGE,
# 4. `podman save` to $SIDELANE_CACHE/sidelane-image.tar (docker-archive),
#    which `ctr -n k8s.io images import` and `docker load` read.
# podman keeps its storage under $SIDELANE_CACHE/image/podman, not in the
# machine's /var/lib/containers. REBUILD_BASE=1 remakes the base rootfs.
# An archive whose inputs (Dockerfile, both binaries, IMAGE, VERSION) are
# unchanged is kept (its $OUT.inputs records them). TAG_SUFFIX is appended
# to the default tag (make node-e2e's second image for helm upgrade).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SIDELANE_CACHE:-${HOME}/.cache/sidelane}"
appversion=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/sidelane/Chart.yaml)
IMAGE="${IMAGE:-ghcr.io/sidelane/sidelane:${appversion}${TAG_SUFFIX:-}}"
VERSION="${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}"
OUT="${OUT:-${CACHE}/sidelane-image.tar}"
BASE_NAME=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile | head -1)
dir="${CACHE}/image"
podman=(podman --root "${dir}/podman/storage" --runroot "${dir}/podman/run" --storage-driver vfs)

for c in mmdebstrap podman; do
  command -v "$c" >/dev/null || { echo "build-image: $c not found; install it with: hack/install-deps.sh image" >&2; exit 1; }
done
for b in sidelane sidelane-cni; do
  [[ -x "bin/${b}" ]] || { echo "build-image: bin/${b} missing; run make build first" >&2; exit 1; }
done
mkdir -p "${dir}"
inputs=$(printf '%s %s\n' "${IMAGE}" "${VERSION}"; sha256sum Dockerfile bin/sidelane bin/sidelane-cni)
if [[ -s "${OUT}" && -f "${OUT}.inputs" && "$(cat "${OUT}.inputs")" == "${inputs}" ]]; then
  echo "build-image: ${IMAGE} (version ${VERSION}) unchanged in ${OUT}"
  exit 0
fi

if [[ -n "${REBUILD_BASE:-}" || ! -s "${dir}/base.tar" ]]; then
  echo "build-image: base rootfs (mmdebstrap bookworm minbase + iptables, nftables)"
  start=$(date +%s)
  rm -f "${dir}/base.tmp.tar"
  mmdebstrap --quiet --variant=minbase --include=iptables,nftables bookworm "${dir}/base.tmp.tar"
  mv "${dir}/base.tmp.tar" "${dir}/base.tar"
  "${podman[@]}" rmi -f "${BASE_NAME}" >/dev/null 2>&1 || true
  echo "build-image: base rootfs built in $(( $(date +%s) - start ))s"
fi
if ! "${podman[@]}" image exists "${BASE_NAME}"; then
  "${podman[@]}" import --quiet "${dir}/base.tar" "${BASE_NAME}" >/dev/null
fi

"${podman[@]}" build --quiet --pull=never --build-arg VERSION="${VERSION}" -t "${IMAGE}" . >/dev/null
rm -f "${OUT}.tmp"
"${podman[@]}" save --quiet --format docker-archive -o "${OUT}.tmp" "${IMAGE}"
mv "${OUT}.tmp" "${OUT}"
printf '%s\n' "${inputs}" > "${OUT}.inputs"
echo "build-image: ${IMAGE} (version ${VERSION}) -> ${OUT}"
