//go:build !linux

package nftables

import (
	"context"
	"errors"

	"github.com/sidelane/sidelane/agent/store"
)

var errNotLinux = errors.New("the nftables backend needs Linux")

func (*Backend) Enroll(context.Context, *store.Entry) error  { return errNotLinux }
func (*Backend) Unenroll(context.Context, store.Entry) error { return errNotLinux }
func (*Backend) Verify(context.Context, store.Entry) error   { return errNotLinux }

func (*Backend) Move(context.Context, store.Entry, *store.Entry) error { return errNotLinux }

// Probe reports whether this node can run the nftables backend.
func Probe(context.Context) error { return errNotLinux }
