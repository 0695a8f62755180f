//go:build !linux

package istiodharness

import "syscall"

func sysProcAttr() *syscall.SysProcAttr { return nil }
