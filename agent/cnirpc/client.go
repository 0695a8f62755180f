package cnirpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// ErrUnreachable wraps every failure to reach the agent (no socket, refused,
// timed out before a reply), so the plugin can apply its failPolicy to
// exactly those cases.
var ErrUnreachable = errors.New("sidelane agent unreachable")

// Client sends requests to the agent's socket.
type Client struct {
	Socket  string
	Timeout time.Duration
}

// Do sends one request and waits for the reply within the client's timeout.
func (c Client) Do(ctx context.Context, req Request) (*Reply, error) {
	req.Version = Version
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Socket)
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %w", ErrUnreachable, c.Socket, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		return nil, fmt.Errorf("%w at %s: send: %w", ErrUnreachable, c.Socket, err)
	}
	if uc, ok := conn.(*net.UnixConn); ok {
		_ = uc.CloseWrite()
	}
	rep, err := DecodeReply(conn)
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %w", ErrUnreachable, c.Socket, err)
	}
	return rep, nil
}
