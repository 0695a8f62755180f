// Package istiod holds the end-to-end test of sidelane's sidecar-mode L7
// policy against Istio's real control plane: L7Policy -> sidelane's policy
// controller -> EnvoyFilter -> istiod (internal/istiodharness) -> the LDS a
// protected pod's sidecar receives -> the RBAC in it enforced by grpc-go.
// Only test files import anything; the package has no product code.
package istiod
