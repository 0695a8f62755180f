//go:build linux

package choose

import (
	"context"
	"fmt"
	"os/exec"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
)

// probeScript uses every kernel piece Istio's iptables rules need: the
// nat table with REDIRECT and the owner match, the mangle table with the
// conntrack match (INVALID_DROP) and the raw table's CT target (DNS
// conntrack zones).
const probeScript = `*nat
:SIDELANE_PROBE - [0:0]
-A SIDELANE_PROBE -p tcp -m owner --uid-owner 1337 -j RETURN
-A SIDELANE_PROBE -p tcp -j REDIRECT --to-ports 15001
-A OUTPUT -p tcp -j SIDELANE_PROBE
COMMIT
*mangle
-A PREROUTING -m conntrack --ctstate INVALID -j DROP
COMMIT
*raw
-A OUTPUT -p udp -m udp --dport 53 -j CT --zone 1
COMMIT
`

// probeIPTables reports why the iptables backend cannot run here: a
// missing binary, or a kernel without the tables, matches and targets its
// rules use. The rules are tried for real, for both families, in a
// throwaway network namespace, so the node's own rules are never touched.
func probeIPTables(ctx context.Context) error {
	for _, bin := range []string{"iptables", "ip6tables", "iptables-restore", "ip6tables-restore"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("iptables: %w", err)
		}
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("iptables probe: current netns: %w", err)
	}
	defer orig.Close()
	scratch, err := netns.New() // unshare(CLONE_NEWNET) for this thread only
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("iptables probe: new netns: %w", err)
	}
	defer scratch.Close()
	defer func() {
		// A thread that cannot go back stays locked, and Go ends it
		// with its goroutine.
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
	}()
	for _, bin := range []string{"iptables-restore", "ip6tables-restore"} {
		cmd := exec.CommandContext(ctx, bin, "-w", "10")
		cmd.Stdin = strings.NewReader(probeScript)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("iptables: %s: %w: %s", bin, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}
