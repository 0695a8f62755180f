package cnirpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
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

	mu sync.Mutex
	ln net.Listener
	wg sync.WaitGroup
}

// Listen creates the socket with mode 0600: only root on the node (the
// container runtime running the plugin) may talk to the agent.
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

	rep := s.handle(ctx, conn)
	rep.Version = Version
	if err := json.NewEncoder(conn).Encode(rep); err != nil {
		s.Log.Warn("write reply", "error", err)
	}
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
