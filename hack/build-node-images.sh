#!/usr/bin/env bash
# Builds the images the real-node test (make node-e2e) runs, from Debian's
# busybox-static, without a registry or a Docker daemon:
#   sidelane.local/pause:2    the sandbox (pause) image: busybox sleep
#   sidelane.local/busybox:1  test pods: busybox with its applets installed
#   sidelane.local/proxyv2:2  stands in for Istio's proxyv2 in injected pods:
#                             Istio's real pilot-agent (istio-validation init
#                             container) and Debian's haproxy playing Envoy (no
#                             Envoy exists here), on a bookworm rootfs with
#                             haproxy from mmdebstrap (cached like the image's)
# into $SIDELANE_CACHE/node-images/*.tar (docker-archive, for ctr import).
# Cached: rebuilt only when an archive is missing.
set -euo pipefail

CACHE="${SIDELANE_CACHE:-${HOME}/.cache/sidelane}"
dir="${CACHE}/image"
out="${CACHE}/node-images"
podman=(podman --root "${dir}/podman/storage" --runroot "${dir}/podman/run" --storage-driver vfs)
busybox=/bin/busybox
[[ -x "${busybox}" ]] && file -L "${busybox}" 2>/dev/null | grep -q static || busybox=$(dpkg -L busybox-static 2>/dev/null | grep -m1 '/busybox$' || true)
[[ -x "${busybox}" ]] || { echo "build-node-images: busybox-static missing; install it with: hack/install-deps.sh node" >&2; exit 1; }

pilot_agent="${CACHE}/bin/pilot-agent"
[[ -x "${pilot_agent}" ]] || { echo "build-node-images: ${pilot_agent} missing; run make tools" >&2; exit 1; }

mkdir -p "${out}"
build() { # name dockerfile-body
  local name="$1" body="$2" file="${out}/${1//[:\/]/_}.tar"
  [[ -s "${file}" ]] && return 0
  local ctx
  ctx=$(mktemp -d)
  cp "${busybox}" "${ctx}/busybox"
  [[ "${body}" != *pilot-agent* ]] || cp "${pilot_agent}" "${ctx}/pilot-agent"
  printf '%s\n' "${body}" > "${ctx}/Dockerfile"
  "${podman[@]}" build --quiet --pull=never -t "${name}" "${ctx}" >/dev/null
  rm -rf "${ctx}"
  "${podman[@]}" save --quiet --format docker-archive -o "${file}.tmp" "${name}"
  mv "${file}.tmp" "${file}"
  echo "build-node-images: ${name} -> ${file}"
}

# busybox picks the applet from argv[0]'s name unless that is "busybox".
build sidelane.local/pause:2 'FROM scratch
COPY busybox /bin/busybox
ENTRYPOINT ["/bin/busybox", "sleep", "2147483647"]'

build sidelane.local/busybox:1 'FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENTRYPOINT ["/bin/sh"]'

if [[ ! -s "${out}/sidelane.local_proxyv2_2.tar" ]]; then
  if [[ ! -s "${dir}/proxy-base.tar" ]]; then
    rm -f "${dir}/proxy-base.tmp.tar"
    mmdebstrap --quiet --variant=minbase --include=haproxy bookworm "${dir}/proxy-base.tmp.tar"
    mv "${dir}/proxy-base.tmp.tar" "${dir}/proxy-base.tar"
  fi
  "${podman[@]}" image exists sidelane.local/proxy-base:bookworm ||
    "${podman[@]}" import --quiet "${dir}/proxy-base.tar" sidelane.local/proxy-base:bookworm >/dev/null
fi
build sidelane.local/proxyv2:2 'FROM sidelane.local/proxy-base:bookworm
COPY busybox /usr/local/bin/busybox
RUN ["/usr/local/bin/busybox", "ln", "-s", "busybox", "/usr/local/bin/nc"]
COPY pilot-agent /usr/local/bin/pilot-agent
ENTRYPOINT ["/usr/local/bin/pilot-agent"]'
