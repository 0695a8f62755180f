// Package conformance holds sidelane's conformance suites, run by
// `make conformance` as root in real network namespaces:
//
//   - CNI: the sidelane-cni plugin chained after the real reference plugins
//     (bridge + host-local, loopback), driven through libcni and containerd's
//     go-cni, for every CNI spec version the plugin supports.
//
// The suites live in _test.go files; `make conformance` summarises them with
// a final "N passed, N failed" line.
package conformance
