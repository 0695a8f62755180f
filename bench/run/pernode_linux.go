//go:build linux

package run

import (
	"fmt"
	"os"
	"path/filepath"

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
	cpus                string // podnet.NodeProxy.CPUs
	Stats               string
	files               []*os.File // inbound listeners, one per pod
	proc                *podnet.NodeProxyProc
}

// addPerNode loads a capture for the per-node contender on node n (net)
// with its node proxy in that node's router netns, and returns the
// contender, or an error saying why not. Node 2's contender is node 1's
// remote: a cross-node pair passes both node proxies.
func (m *Mesh) addPerNode(tb podnet.TB, net *podnet.Net, n int) (*Contender, error) {
	l, err := m.loadEBPF(tb, fmt.Sprintf("%s-node%d", report.PerNode, n), false)
	if err != nil {
		return nil, err
	}
	host := filepath.Join("/run/netns", net.Router())
	cookie, err := bpf.NetnsCookie(host)
	if err != nil {
		return nil, err
	}
	if err := l.capture.SetNodeProxy(bpf.NodeProxy{Netns: cookie, IPv4: net.Gateway4(), Port: capture.OutboundPort}); err != nil {
		return nil, err
	}
	dp := ebpf.New(l.capture, m.log)
	dp.SetNodeInboundPort(capture.InboundPort)
	np := &benchNodeProxy{router: net.Router(), cgroup: l.cgroup, dir: tb.TempDir(), gw: net.Gateway4().String()}
	if m.pin {
		// Node 1 holds the servers, node 2 only cross-node clients.
		np.cpus = serverCPU
		if n == 2 {
			np.cpus = clientCPU
		}
	}
	np.Stats = filepath.Join(np.dir, "stats.sock")
	tb.Cleanup(np.stop)
	return &Contender{Name: report.PerNode, Cgroup: l.cgroup, nodeProxy: np,
		install: func(tb podnet.TB, p *Pod, ann map[string]string) {
			enroll(tb, dp, p, ann, "node")
			if err := np.add(p); err != nil {
				tb.Fatalf("node proxy: %v", err)
			}
		}}, nil
}

func (np *benchNodeProxy) add(p *Pod) error {
	f, err := podnet.ListenIn(p.NS.Path, capture.InboundPort)
	if err != nil {
		return err
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
	var out podnet.Buffer
	proc, err := podnet.StartNodeProxy(np.router, np.cgroup, filepath.Join(np.dir, "node-proxy.cfg"),
		podnet.NodeProxy{Addr: np.gw, OutPort: capture.OutboundPort, Inbound: names, StatsSocket: np.Stats, CPUs: np.cpus}, np.files, &out)
	if err != nil {
		return fmt.Errorf("%w: %s", err, out.String())
	}
	np.proc = proc
	return nil
}

func (np *benchNodeProxy) stop() {
	if np.proc != nil {
		np.proc.Stop()
		np.proc = nil
	}
}
