#!/usr/bin/env bash
# Installs the real third-party components the tests drive, at pinned
# versions, into a cache outside the clone (default ~/.cache/sidelane/bin).
# Each tool is built once; later runs return at once.
set -euo pipefail

CACHE="${SIDELANE_CACHE:-${HOME}/.cache/sidelane}"
BIN="${CACHE}/bin"
mkdir -p "${BIN}"

CNI_PLUGINS_VERSION=v1.9.1
CNI_VERSION=v1.3.0
ISTIO_VERSION=v0.0.0-20260827124520-eed52ebb66ad
HELM_VERSION=v3.16.4

# install NAME PACKAGE@VERSION: go install into BIN unless a binary stamped
# with the same version is already there.
install() {
  local name="$1" pkg="$2" stamp="${BIN}/.${1}.version"
  if [[ -x "${BIN}/${name}" && -f "${stamp}" && "$(cat "${stamp}")" == "${pkg}" ]]; then
    return 0
  fi
  echo "install-tools: ${name} (${pkg})"
  local start; start=$(date +%s)
  GOBIN="${BIN}" CGO_ENABLED=0 go install "${pkg}"
  echo "${pkg}" > "${stamp}"
  echo "install-tools: ${name} took $(( $(date +%s) - start ))s"
}

want="${*:-cni istio istiod helm}"
for group in ${want}; do
  case "${group}" in
    cni)
      for p in main/bridge main/ptp main/loopback ipam/host-local; do
        install "$(basename "$p")" "github.com/containernetworking/plugins/plugins/${p}@${CNI_PLUGINS_VERSION}"
      done
      install cnitool "github.com/containernetworking/cni/cnitool@${CNI_VERSION}"
      install noop "github.com/containernetworking/cni/plugins/test/noop@${CNI_VERSION}"
      ;;
    istio)
      install pilot-agent "istio.io/istio/pilot/cmd/pilot-agent@${ISTIO_VERSION}"
      ;;
    istiod)
      # Istio's control plane, for tests that check what istiod makes of
      # sidelane's EnvoyFilters (internal/istiodharness).
      install pilot-discovery "istio.io/istio/pilot/cmd/pilot-discovery@${ISTIO_VERSION}"
      ;;
    istioctl)
      install istioctl "istio.io/istio/istioctl/cmd/istioctl@${ISTIO_VERSION}"
      ;;
    helm)
      install helm "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
      ;;
    *) echo "install-tools: unknown group ${group}" >&2; exit 2 ;;
  esac
done
