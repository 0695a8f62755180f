// Package nodeharness runs one real Kubernetes node on this machine for
// tests: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
// kubelet, containerd and runc, all real binaries, the primary CNI the
// reference bridge + host-local conflist in a conf dir containerd reads.
//
// Safety on a shared machine: every process runs inside a network
// namespace of the node's own (the node IP is a /32 on its lo, no route
// leads out) and inside a private mount namespace in which / is shared
// (containerd's mount propagation needs that; the machine's / stays as it
// is), in a cgroup subtree created in every hierarchy under /sys/fs/cgroup
// and used as kubelet's cgroupRoot. Stop kills the whole subtree (the
// containerd shims and containers included), removes the namespaces,
// cgroups and files, and restores the kernel settings kubelet changes at
// start. Stop also runs on SIGINT/SIGTERM.
//
// Only tests use it (Linux only).
package nodeharness
