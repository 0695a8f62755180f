package cnirpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// Handler does the work behind each operation. A returned error is sent to
// the plugin as the reply's Error; wrap ErrRetry for transient failures.
type Handler interface {
	Handle(ctx context.Context, req *Request) (*Reply, error)
}

// ErrRetry marks an error as transient (CNI code 11, "try again later").
var ErrRetry = errors.New("try again later")

// Server accepts plugin connections on a Unix socket.
type Server struct {
	Socket  string
	Handler Handler
	Log     *slog.Logger
	// Timeout bounds the handling of one request, reply included.
	Timeout time.Duration
	// AllowUIDs are the peer uids (SO_PEERCRED) served besides the
	// agent's own; nil means root only. See Server.trusted.
	AllowUIDs []uint32
	// Refused, when set, is called for every peer refused by its uid
	// (the agent counts them in sidelane_errors_total).
	Refused func(Peer)

	mu sync.Mutex
	ln net.Listener
	wg sync.WaitGroup
}

// Listen creates the socket with mode 0600: only root on the node (the
// container runtime running the plugin) may talk to the agent; Serve
// checks each peer's uid again (Server.trusted).
func (s *Server) Listen() error {
	if err := os.MkdirAll(filepath.Dir(s.Socket), 0o750); err != nil {
		return fmt.Errorf("create socket dir: %w", err)
	}
	if err := os.Remove(s.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", s.Socket, err)
	}
	ln, err := net.Listen("unix", s.Socket)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", s.Socket, err)
	}
	if err := os.Chmod(s.Socket, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("chmod %s: %w", s.Socket, err)
	}
	s.mu.Lock()
	s.ln = ln
	s.mu.Unlock()
	return nil
}

// Serve handles connections until ctx ends or the listener is closed.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	ln := s.ln
	s.mu.Unlock()
	if ln == nil {
		return errors.New("serve before listen")
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			s.wg.Wait()
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(ctx, conn)
		}()
	}
}

// Close stops accepting and removes the socket.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	err := s.ln.Close()
	s.ln = nil
	s.wg.Wait()
	return err
}

func (s *Server) serveConn(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	timeout := s.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	_ = conn.SetDeadline(time.Now().Add(timeout))

	var rep *Reply
	if peer, err := peerOf(conn); err != nil || !s.trusted(peer) {
		rep = s.refuse(conn, peer, err)
	} else {
		rep = s.handle(ctx, conn)
	}
	rep.Version = Version
	if err := json.NewEncoder(conn).Encode(rep); err != nil {
		s.Log.Warn("write reply", "error", err)
	}
}

// refuse answers a peer the socket does not serve, without decoding its
// request (read and dropped, bounded, so the peer gets the reply rather
// than a reset), and counts it.
func (s *Server) refuse(conn net.Conn, p Peer, err error) *Reply {
	_, _ = io.Copy(io.Discard, io.LimitReader(conn, MaxMessageSize))
	if s.Refused != nil {
		s.Refused(p)
	}
	if err != nil {
		s.Log.Warn("refused a peer on the agent socket", "error", err)
		return &Reply{Error: fmt.Sprintf("agent socket: %v", err)}
	}
	s.Log.Warn("refused a peer on the agent socket", "uid", p.UID, "gid", p.GID, "pid", p.PID)
	return &Reply{Error: fmt.Sprintf("agent socket: peer uid %d (pid %d) is not allowed", p.UID, p.PID)}
}

func (s *Server) handle(ctx context.Context, conn net.Conn) (rep *Reply) {
	defer func() {
		if p := recover(); p != nil {
			s.Log.Error("handler panic", "panic", p)
			rep = &Reply{Error: fmt.Sprintf("agent internal error: %v", p)}
		}
	}()
	req, err := DecodeRequest(conn)
	if err != nil {
		return &Reply{Error: err.Error()}
	}
	rep, err = s.Handler.Handle(ctx, req)
	if err != nil {
		return &Reply{Error: err.Error(), Retry: errors.Is(err, ErrRetry)}
	}
	if rep == nil {
		rep = &Reply{}
	}
	rep.OK = true
	return rep
}

// Peer is the process at the other end of a connection, from the kernel
// (SO_PEERCRED at connect time), not from anything the peer sends.
type Peer struct {
	PID      int32
	UID, GID uint32
}

// errPeerUnknown: the kernel gave no credentials for the peer.
var errPeerUnknown = errors.New("peer credentials unavailable")

// trusted decides which peers may use the socket. Every operation on it
// changes what is captured (ADD enrolls a netns, DEL and GC with an empty
// list un-capture pods) or reveals pod details (explain), so only the
// container runtime running the plugin, which is root, may talk to it:
// the socket's mode 0600 says so to the file system, and this check says
// it again to any process that gets past the file mode (a container given
// the directory, CAP_DAC_OVERRIDE, a loosened mode). The agent's own uid
// is always trusted (a process of that uid can control the agent anyway);
// AllowUIDs replaces root for runtimes that run CNI plugins as another uid.
func (s *Server) trusted(p Peer) bool {
	if p.UID == uint32(os.Geteuid()) {
		return true
	}
	if s.AllowUIDs == nil {
		return p.UID == 0
	}
	return slices.Contains(s.AllowUIDs, p.UID)
}
