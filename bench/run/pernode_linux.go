//go:build linux

package run

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/bench/report"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/istio/capture"
)

// benchNodeProxy is the per-node contender's node proxy: haproxy in the
// node's router netns (its host netns) and the contender's cgroup, outbound
// listener gateway:15001, one inbound listener per per-node pod created in
// the pod's netns and handed over as fd@N, upstream from the gateway. It is
// restarted when a pod joins (Envoy would get a listener over xDS).
type benchNodeProxy struct {
	router, cgroup, dir string
	gw                  string
	Stats               string
	files               []*os.File // inbound listeners, one per pod
	cmd                 *exec.Cmd
	done                chan struct{}
}

// addPerNode loads a capture for the per-node contender on the mesh's
// first node and returns the contender, or an error saying why not.
func (m *Mesh) addPerNode(tb podnet.TB) (*Contender, error) {
	l, err := m.loadEBPF(tb, false)
	if err != nil {
		return nil, err
	}
	host := filepath.Join("/run/netns", m.net.Router())
	cookie, err := bpf.NetnsCookie(host)
	if err != nil {
		return nil, err
	}
	if err := l.capture.SetNodeProxy(bpf.NodeProxy{Netns: cookie, IPv4: m.net.Gateway4(), Port: capture.OutboundPort}); err != nil {
		return nil, err
	}
	dp := ebpf.New(l.capture, m.log)
	dp.SetNodeInboundPort(capture.InboundPort)
	np := &benchNodeProxy{router: m.net.Router(), cgroup: l.cgroup, dir: tb.TempDir(), gw: m.net.Gateway4().String()}
	np.Stats = filepath.Join(np.dir, "stats.sock")
	tb.Cleanup(np.stop)
	return &Contender{Name: report.PerNode, Cgroup: l.cgroup, nodeProxy: np,
		noRemote: "the per-node contender has one node proxy (on the server's node); cross-node per-node traffic is tested in test/e2e TestPerNode, not benchmarked",
		install: func(tb podnet.TB, p *Pod, ann map[string]string) {
			enroll(tb, dp, p, ann, "node")
			if err := np.add(p); err != nil {
				tb.Fatalf("node proxy: %v", err)
			}
		}}, nil
}

func (np *benchNodeProxy) add(p *Pod) error {
	var f *os.File
	err := p.NS.Do(func() error {
		l, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", capture.InboundPort))
		if err != nil {
			return err
		}
		defer l.Close()
		f, err = l.(*net.TCPListener).File()
		return err
	})
	if err != nil {
		return fmt.Errorf("inbound listener in %s: %w", p.NS.Name, err)
	}
	np.files = append(np.files, f)
	return np.restart()
}

func (np *benchNodeProxy) restart() error {
	np.stop()
	var names []string
	for i := range np.files {
		names = append(names, fmt.Sprint(i))
	}
	cfg := podnet.NodeProxyConfig(podnet.NodeProxy{Addr: np.gw, OutPort: capture.OutboundPort, Inbound: names, StatsSocket: np.Stats})
	path := filepath.Join(np.dir, "node-proxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return err
	}
	cmd := exec.Command("ip", "netns", "exec", np.router, "haproxy", "-db", "-f", path)
	cmd.ExtraFiles = np.files
	var out podnet.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	closeCg, err := podnet.InCgroup(cmd, np.cgroup)
	if err != nil {
		return err
	}
	err = cmd.Start()
	closeCg()
	if err != nil {
		return fmt.Errorf("start haproxy: %w", err)
	}
	np.cmd, np.done = cmd, make(chan struct{})
	done := np.done
	go func() { _ = cmd.Wait(); close(done) }()
	for range 200 {
		select {
		case <-done:
			return fmt.Errorf("haproxy exited: %s", out.String())
		default:
		}
		ss, _ := exec.Command("ip", "netns", "exec", np.router, "ss", "-Hltn").Output()
		if strings.Contains(string(ss), fmt.Sprintf("%s:%d ", np.gw, capture.OutboundPort)) {
			return nil
		}
		time.Sleep(25 * time.Millisecond)
	}
	return fmt.Errorf("haproxy not listening: %s", out.String())
}

func (np *benchNodeProxy) stop() {
	if np.cmd == nil {
		return
	}
	_ = np.cmd.Process.Signal(syscall.SIGKILL)
	<-np.done
	np.cmd = nil
}
