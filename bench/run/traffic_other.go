//go:build !linux

package run

import (
	"context"
	"errors"
)

func (r *Runner) traffic(context.Context) error {
	return errors.New("traffic scenarios need Linux network namespaces")
}
