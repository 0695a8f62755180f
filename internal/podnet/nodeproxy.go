package podnet

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// ListenIn opens a TCP listener on 0.0.0.0:port inside the netns at path
// and returns it as a file to hand to a child process (the node proxy's
// in-pod inbound listener; Envoy opens it itself from
// network_namespace_filepath). The caller closes the file.
func ListenIn(path string, port uint16) (*os.File, error) {
	netns, err := ns.GetNS(path)
	if err != nil {
		return nil, err
	}
	defer netns.Close()
	var f *os.File
	err = netns.Do(func(ns.NetNS) error {
		l, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", port))
		if err != nil {
			return err
		}
		defer l.Close()
		f, err = l.(*net.TCPListener).File()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %d in %s: %w", port, path, err)
	}
	return f, nil
}

// NodeProxyProc is a running node proxy stand-in (haproxy).
type NodeProxyProc struct {
	netns, listen string
	cmd           *exec.Cmd
	done          chan struct{}
}

// StartNodeProxy writes np's config (NodeProxyConfig) to cfgPath and runs
// haproxy in the netns named netns, born in cgroup (below the capture's
// attach point, so the getsockopt hook answers it), with inbound as fd@3,
// fd@4, ... and its output to out. It returns once np.Addr:np.OutPort
// listens. The caller keeps its own copies of inbound and closes them.
func StartNodeProxy(netns, cgroup, cfgPath string, np NodeProxy, inbound []*os.File, out io.Writer) (*NodeProxyProc, error) {
	if err := os.WriteFile(cfgPath, []byte(NodeProxyConfig(np)), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", append(append([]string{"netns", "exec", netns}, Pinned(np.CPUs)...), "haproxy", "-db", "-f", cfgPath)...)
	cmd.ExtraFiles = inbound
	cmd.Stdout, cmd.Stderr = out, out
	closeCg, err := InCgroup(cmd, cgroup)
	if err != nil {
		return nil, err
	}
	err = cmd.Start()
	closeCg()
	if err != nil {
		return nil, fmt.Errorf("start node proxy: %w", err)
	}
	p := &NodeProxyProc{netns: netns, listen: fmt.Sprintf("%s:%d", np.Addr, np.OutPort), cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	for range 400 {
		select {
		case <-p.done:
			return nil, errors.New("node proxy exited (see its output)")
		default:
		}
		if p.listening() {
			return p, nil
		}
		time.Sleep(25 * time.Millisecond)
	}
	p.Stop()
	return nil, fmt.Errorf("node proxy not listening on %s", p.listen)
}

func (p *NodeProxyProc) listening() bool {
	ss, _ := exec.Command("ip", "netns", "exec", p.netns, "ss", "-Hltn").Output()
	return allListening(string(ss), []string{p.listen})
}

// Stop kills the proxy and waits until its outbound listener is gone.
func (p *NodeProxyProc) Stop() {
	_ = p.cmd.Process.Kill()
	<-p.done
	for i := 0; i < 200 && p.listening(); i++ {
		time.Sleep(25 * time.Millisecond)
	}
}
