//go:build !linux

package kubeharness

import "syscall"

func sysProcAttr() *syscall.SysProcAttr { return nil }
