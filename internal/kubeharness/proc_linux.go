package kubeharness

import "syscall"

// sysProcAttr kills the child when the test binary dies, so no etcd or
// apiserver outlives a crashed or killed test run.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
