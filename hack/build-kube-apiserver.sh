#!/usr/bin/env bash
# Builds a real kube-apiserver and kubectl from the Go module proxy and caches
# them outside the clone. The first build takes ~14 minutes on 2 cores; later
# runs return at once. Recipe: ../shared/ENVIRONMENT.md.
#
#   hack/build-kube-apiserver.sh [node]
#
# "node" also builds what a real node needs (make node-e2e): kubelet,
# kube-controller-manager, kube-scheduler and kube-proxy (127 s more for the
# first three once kube-apiserver is built). Every binary is linked with
# its real version (-X .../version.gitVersion), so Helm's kubeVersion
# check accepts the API server (a module-proxy build reports v0.0.0-master).
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.33.13}"
STAGING_VERSION="${STAGING_VERSION:-v0.33.13}"
CACHE="${SIDELANE_CACHE:-${HOME}/.cache/sidelane}"
OUT="${CACHE}/k8s-${K8S_VERSION}"

tools=(kube-apiserver kubectl)
[[ "${1:-}" == node ]] && tools+=(kubelet kube-controller-manager kube-scheduler kube-proxy)
# cached: every wanted binary is there and kube-apiserver reports its
# real version (an older build of this script linked none).
cached() {
  local t
  for t in "${tools[@]}"; do [[ -x "${OUT}/${t}" ]] || return 1; done
  "${OUT}/kube-apiserver" --version 2>/dev/null | grep -qF "${K8S_VERSION}"
}
if cached; then
  echo "kubernetes ${K8S_VERSION} (${tools[*]}): cached in ${OUT}"
  exit 0
fi

# Test binaries running in parallel may all find the binary missing: one
# builds, the others wait for it and then find it cached.
mkdir -p "${CACHE}"
exec 9>"${CACHE}/.k8s-build-${K8S_VERSION}.lock"
flock 9
if cached; then
  echo "kubernetes ${K8S_VERSION} (${tools[*]}): built by a concurrent run, cached in ${OUT}"
  exit 0
fi

echo "kubernetes ${K8S_VERSION} (${tools[*]}): building from the module proxy (first time takes ~14 min on 2 cores)"
start=$(date +%s)
work="${CACHE}/k8s-build-${K8S_VERSION}"
rm -rf "${work}"
mkdir -p "${work}/stubs" "${OUT}"

staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms
  kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller)
# No usable version of these is in the filtered proxy; nothing we build imports them.
stubbed=(code-generator sample-apiserver sample-cli-plugin sample-controller)

{
  echo "module sidelane.local/k8sbuild"
  echo
  echo "go 1.24"
  echo
  echo "require k8s.io/kubernetes ${K8S_VERSION}"
  echo
  for m in "${staging[@]}"; do
    stub=""
    for s in "${stubbed[@]}"; do [[ "$m" == "$s" ]] && stub=1; done
    if [[ -n "$stub" ]]; then
      mkdir -p "${work}/stubs/${m}"
      echo "module k8s.io/${m}" > "${work}/stubs/${m}/go.mod"
      echo "replace k8s.io/${m} => ./stubs/${m}"
    else
      echo "replace k8s.io/${m} => k8s.io/${m} ${STAGING_VERSION}"
    fi
  done
} > "${work}/go.mod"

cat > "${work}/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO

major="${K8S_VERSION#v}"; minor="${major#*.}"; major="${major%%.*}"; minor="${minor%%.*}"
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=${major} -X ${pkg}.gitMinor=${minor}"
done

cd "${work}"
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
GOFLAGS=-mod=mod go get k8s.io/kubernetes@"${K8S_VERSION}"
for t in "${tools[@]}"; do
  # Build next to the target, then rename: a running test keeps its binary.
  GOFLAGS=-mod=mod CGO_ENABLED=0 go build -ldflags "${ldflags}" -o "${OUT}/.${t}.new" "k8s.io/kubernetes/cmd/${t}"
  mv -f "${OUT}/.${t}.new" "${OUT}/${t}"
done
rm -rf "${work}"
echo "kubernetes ${K8S_VERSION} (${tools[*]}): built in $(( $(date +%s) - start ))s -> ${OUT}"
