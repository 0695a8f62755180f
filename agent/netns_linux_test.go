package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/testenv"
)

// TestHandlerRefusesNodeNetns: ADD enrolls the netns it names, so a peer
// that names the node's own netns (the host's, which the hostNetwork agent
// shares, or the agent's) would have the node's traffic captured or the
// iptables backend rewrite the host's rules. Whatever path names it
// (/proc/self/ns/net resolves in the agent), ADD is refused with an error
// naming the path, and nothing is enrolled or recorded. A pod's own netns
// is still accepted.
func TestHandlerRefusesNodeNetns(t *testing.T) {
	alias := filepath.Join(t.TempDir(), "looks-like-a-pod")
	if err := os.Symlink("/proc/self/ns/net", alias); err != nil {
		t.Fatal(err)
	}
	paths := []string{"/proc/self/ns/net", fmt.Sprintf("/proc/%d/ns/net", os.Getpid()), "/proc/thread-self/ns/net", alias}
	if _, err := os.Stat("/proc/1/ns/net"); err == nil {
		paths = append(paths, "/proc/1/ns/net")
	}
	for i, path := range paths {
		t.Run(path, func(t *testing.T) {
			h, dp := newHandler(t, true)
			r := req(cnirpc.OpAdd, fmt.Sprint("host", i))
			r.Netns = path
			_, err := h.Handle(context.Background(), r)
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "node's own network namespace") {
				t.Fatalf("ADD with netns %s: %v, want refused naming the path", path, err)
			}
			if len(dp.enrolled) != 0 || len(h.store.List()) != 0 {
				t.Fatalf("refused ADD enrolled %d, recorded %d", len(dp.enrolled), len(h.store.List()))
			}
		})
	}
	t.Run("pod netns", func(t *testing.T) {
		testenv.Privileged(t)
		n := testenv.NewNS(t)
		h, dp := newHandler(t, true)
		r := req(cnirpc.OpAdd, "pod")
		r.Netns = n.Path()
		if _, err := h.Handle(context.Background(), r); err != nil {
			t.Fatalf("ADD with a pod's netns: %v", err)
		}
		if len(dp.enrolled) != 1 {
			t.Fatal("pod not enrolled")
		}
		// The netns's identity is kept, so a datapath re-opening the
		// path later notices when it names another one.
		_, ino, err := store.NetnsIdentity(n.Path())
		if err != nil {
			t.Fatal(err)
		}
		if es := h.store.List(); len(es) != 1 || es[0].NetnsIno != ino || es[0].CheckNetns() != nil {
			t.Fatalf("recorded %+v, want netns inode %d", es, ino)
		}
	})
}
