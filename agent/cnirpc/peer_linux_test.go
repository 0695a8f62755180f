package cnirpc

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sidelane/sidelane/internal/testenv"
)

// dialEnv makes the test binary act as a client of the socket it names
// (see TestMain), so a test can talk to a server from another uid.
const dialEnv = "SIDELANE_CNIRPC_TEST_DIAL"

func TestMain(m *testing.M) {
	if sock := os.Getenv(dialEnv); sock != "" {
		rep, err := Client{Socket: sock, Timeout: 5 * time.Second}.Do(context.Background(), Request{Op: OpStatus})
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(2)
		}
		_ = json.NewEncoder(os.Stdout).Encode(rep)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// dialAs sends a status request to sock from a child process (bin, a copy
// of the test binary that uid can run) running as uid/gid, with no
// capabilities, and returns its reply.
func dialAs(t *testing.T, bin, sock string, uid uint32) *Reply {
	t.Helper()
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), dialEnv+"="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("client as uid %d: %v\n%s", uid, err, out)
	}
	var rep Reply
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("client as uid %d: %v\n%s", uid, err, out)
	}
	return &rep
}

// TestPeerCredentials: the CNI socket serves only the uids it trusts
// (root, the container runtime running the plugin, and the agent's own),
// whatever the socket file's mode says. The file is made world-writable
// here, as a hostPath shared with another container or a process with
// CAP_DAC_OVERRIDE would see it: a peer of another uid must still be
// refused, and counted, and the handler never called.
func TestPeerCredentials(t *testing.T) {
	testenv.Privileged(t)
	const nobody = 65534
	dir, err := os.MkdirTemp("", "sidelane-peer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The test binary's own dir is private to root.
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "client")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		allow  []uint32
		wantOK map[uint32]bool
	}{
		{"default", nil, map[uint32]bool{0: true, nobody: false}},
		{"allow-listed", []uint32{nobody}, map[uint32]bool{0: true, nobody: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(dir, tc.name+".sock")
			var handled, refused atomic.Int32
			srv := &Server{Socket: sock, Log: slog.New(slog.DiscardHandler), AllowUIDs: tc.allow,
				Refused: func(Peer) { refused.Add(1) },
				Handler: handlerFunc(func(context.Context, *Request) (*Reply, error) {
					handled.Add(1)
					return &Reply{Ready: true}, nil
				})}
			if err := srv.Listen(); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(sock, 0o666); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error)
			go func() { done <- srv.Serve(ctx) }()
			t.Cleanup(func() { cancel(); <-done })

			wantRefused := int32(0)
			for _, uid := range []uint32{0, nobody} {
				rep := dialAs(t, bin, sock, uid)
				if tc.wantOK[uid] {
					if !rep.OK || !rep.Ready {
						t.Errorf("uid %d: reply %+v, want served", uid, rep)
					}
					continue
				}
				wantRefused++
				if rep.OK || !strings.Contains(rep.Error, fmt.Sprintf("uid %d", uid)) || !strings.Contains(rep.Error, "not allowed") {
					t.Errorf("uid %d: reply %+v, want refused naming the uid", uid, rep)
				}
			}
			if got := refused.Load(); got != wantRefused {
				t.Errorf("refused counted %d times, want %d", got, wantRefused)
			}
			if got, want := handled.Load(), int32(2)-wantRefused; got != want {
				t.Errorf("handler called %d times, want %d", got, want)
			}
		})
	}
}
