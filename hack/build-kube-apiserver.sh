#!/usr/bin/env bash
# Builds a real kube-apiserver and kubectl from the Go module proxy and caches
# them outside the clone. The first build takes ~14 minutes on 2 cores; later
# runs return at once. Recipe: ../shared/ENVIRONMENT.md.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.33.13}"
STAGING_VERSION="${STAGING_VERSION:-v0.33.13}"
CACHE="${SIDELANE_CACHE:-${HOME}/.cache/sidelane}"
OUT="${CACHE}/k8s-${K8S_VERSION}"

if [[ -x "${OUT}/kube-apiserver" && -x "${OUT}/kubectl" ]]; then
  echo "kube-apiserver ${K8S_VERSION}: cached in ${OUT}"
  exit 0
fi

# Test binaries running in parallel may all find the binary missing: one
# builds, the others wait for it and then find it cached.
mkdir -p "${CACHE}"
exec 9>"${CACHE}/.k8s-build-${K8S_VERSION}.lock"
flock 9
if [[ -x "${OUT}/kube-apiserver" && -x "${OUT}/kubectl" ]]; then
  echo "kube-apiserver ${K8S_VERSION}: built by a concurrent run, cached in ${OUT}"
  exit 0
fi

echo "kube-apiserver ${K8S_VERSION}: building from the module proxy (first time takes ~14 min on 2 cores)"
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
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO

cd "${work}"
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
GOFLAGS=-mod=mod go get k8s.io/kubernetes@"${K8S_VERSION}"
GOFLAGS=-mod=mod CGO_ENABLED=0 go build -o "${OUT}/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
GOFLAGS=-mod=mod CGO_ENABLED=0 go build -o "${OUT}/kubectl" k8s.io/kubernetes/cmd/kubectl
rm -rf "${work}"
echo "kube-apiserver ${K8S_VERSION}: built in $(( $(date +%s) - start ))s -> ${OUT}"
