//go:build !linux

package choose

import (
	"context"
	"errors"
)

func probeIPTables(context.Context) error { return errors.New("iptables needs Linux") }
