#!/usr/bin/env bash
# Regenerates the classification fixtures with Istio's real injector:
#   testdata/istio/<install>/  the injector config, values and mesh config that
#                              `istioctl manifest generate` renders (see installs
#                              in fixtures_test.go);
#   testdata/pods/<name>.yaml  `istioctl kube-inject` of testdata/apps/*.yaml with
#                              those files (see fixtures in fixtures_test.go).
# kube-inject needs a reachable API server, so the test starts one
# (internal/kubeharness). Then review the diff and refresh the golden decisions:
#   go test ./istio/classify/ -run TestGolden -update
set -euo pipefail
cd "$(dirname "$0")/../../.."
hack/install-tools.sh istioctl
go test -count=1 -v ./istio/classify/ -run '^TestGenerateFixtures$' -args -regen
