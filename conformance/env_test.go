package conformance

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/agentproc"
	"github.com/sidelane/sidelane/internal/testenv"
)

// cniVersions are the spec versions sidelane-cni supports, oldest first.
var cniVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// env is one version's world: a bridge, a subnet, an agent process and the
// plugin search path.
type env struct {
	t          *testing.T
	version    string
	network    string
	bridge     string
	subnet     netip.Prefix
	pluginDirs []string
	cacheDir   string
	ipamDir    string
	agent      *agentProc
	cni        *libcni.CNIConfig
}

func newEnv(t *testing.T, version string) *env {
	t.Helper()
	testenv.Privileged(t)
	sidelaneBin := testenv.SidelaneBin(t)
	testenv.RequireTool(t, "bridge")
	testenv.RequireTool(t, "host-local")
	testenv.RequireTool(t, "noop")
	testenv.RequireTool(t, "loopback")
	dir := t.TempDir()
	e := &env{
		t:          t,
		version:    version,
		network:    testenv.UniqueName("slconf-"),
		bridge:     testenv.UniqueName("slc"),
		subnet:     randomSubnet(),
		pluginDirs: []string{sidelaneBin, testenv.ToolBin(t)},
		cacheDir:   filepath.Join(dir, "cache"),
		ipamDir:    filepath.Join(dir, "ipam"),
	}
	e.agent = startAgent(t, filepath.Join(sidelaneBin, "sidelane"), dir)
	e.cni = libcni.NewCNIConfigWithCacheDir(e.pluginDirs, e.cacheDir, nil)
	t.Cleanup(func() {
		// The bridge plugin leaves its bridge behind after DEL.
		if l, err := netlink.LinkByName(e.bridge); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	return e
}

// randomSubnet picks a /24 in 10.200.0.0/13 so parallel runs rarely collide.
func randomSubnet() netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(200 + rand.IntN(8)), byte(rand.IntN(256)), 0}), 24)
}

// pluginConf is the sidelane entry; extra fields are merged in.
func (e *env) pluginConf(extra map[string]any) map[string]any {
	c := map[string]any{"type": "sidelane-cni", "agentSocket": e.agent.socket, "agentTimeout": "2s", "logLevel": "debug"}
	for k, v := range extra {
		c[k] = v
	}
	return c
}

func (e *env) bridgeConf() map[string]any {
	return map[string]any{
		"type": "bridge", "bridge": e.bridge, "isGateway": true, "ipMasq": false,
		"ipam": map[string]any{
			"type":    "host-local",
			"ranges":  [][]map[string]string{{{"subnet": e.subnet.String()}}},
			"dataDir": e.ipamDir,
		},
	}
}

// confList builds bridge -> sidelane (-> more) for this version.
func (e *env) confList(sidelane map[string]any, more ...map[string]any) *libcni.NetworkConfigList {
	e.t.Helper()
	plugins := append([]map[string]any{e.bridgeConf(), e.pluginConf(sidelane)}, more...)
	raw, err := json.Marshal(map[string]any{"cniVersion": e.version, "name": e.network, "plugins": plugins})
	if err != nil {
		e.t.Fatal(err)
	}
	list, err := libcni.ConfListFromBytes(raw)
	if err != nil {
		e.t.Fatalf("conflist: %v", err)
	}
	return list
}

func runtimeConf(id string, n ns.NetNS, podName string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: id,
		NetNS:       n.Path(),
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", "conformance"},
			{"K8S_POD_NAME", podName},
			{"K8S_POD_UID", "uid-" + id},
		},
	}
}

// agentProc is the real `sidelane agent` binary, started and stopped by tests.
type agentProc struct {
	*agentproc.Proc
	t        *testing.T
	socket   string
	stateDir string
}

func startAgent(t *testing.T, bin, dir string) *agentProc {
	p := agentproc.New(bin, filepath.Join(dir, "agent"))
	a := &agentProc{Proc: p, t: t, socket: p.Socket, stateDir: p.StateDir}
	a.start()
	t.Cleanup(func() {
		a.stop()
		if t.Failed() {
			t.Logf("agent logs:\n%s", a.Logs())
		}
	})
	return a
}

func (a *agentProc) start() {
	a.t.Helper()
	if err := a.Start(context.Background()); err != nil {
		a.t.Fatal(err)
	}
}

func (a *agentProc) stop() { a.Stop() }

// entries reads the agent's persisted state (the agent must be stopped or
// idle: the file is replaced atomically, so a read is always consistent).
func (a *agentProc) entries() []store.Entry {
	a.t.Helper()
	s, err := store.Open(filepath.Join(a.stateDir, "state.json"))
	if err != nil {
		a.t.Fatal(err)
	}
	return s.List()
}

func (a *agentProc) has(network, containerID string) bool {
	for _, e := range a.entries() {
		if e.Network == network && e.ContainerID == containerID {
			return true
		}
	}
	return false
}

// forget removes one attachment from the agent's state while it is stopped,
// as if the agent had lost it.
func (a *agentProc) forget(network, containerID string) {
	a.t.Helper()
	a.stop()
	s, err := store.Open(filepath.Join(a.stateDir, "state.json"))
	if err != nil {
		a.t.Fatal(err)
	}
	if _, had, err := s.Delete(store.Key{Network: network, ContainerID: containerID, IfName: "eth0"}); err != nil || !had {
		a.t.Fatalf("forget %s: had=%v err=%v", containerID, had, err)
	}
	a.start()
}

// invocation is one direct run of the plugin binary, as a runtime does it.
type invocation struct {
	command, containerID, netns, ifname, args string
	stdin                                     []byte
}

type outcome struct {
	stdout, stderr []byte
	exitCode       int
}

// cniError is the spec's error object.
type cniError struct {
	CNIVersion string `json:"cniVersion"`
	Code       uint   `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details"`
}

func (e *env) invoke(inv invocation) outcome {
	e.t.Helper()
	if inv.ifname == "" {
		inv.ifname = "eth0"
	}
	cmd := exec.Command(filepath.Join(e.pluginDirs[0], "sidelane-cni"))
	cmd.Env = []string{
		"CNI_COMMAND=" + inv.command,
		"CNI_CONTAINERID=" + inv.containerID,
		"CNI_NETNS=" + inv.netns,
		"CNI_IFNAME=" + inv.ifname,
		"CNI_ARGS=" + inv.args,
		"CNI_PATH=" + strings.Join(e.pluginDirs, ":"),
	}
	cmd.Stdin = bytes.NewReader(inv.stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := outcome{stdout: stdout.Bytes(), stderr: stderr.Bytes()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		out.exitCode = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("run plugin: %v", err)
	}
	// Whatever happens, stdout is exactly one JSON value (or empty for DEL,
	// CHECK, GC, STATUS success).
	if len(bytes.TrimSpace(out.stdout)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(out.stdout))
		var v any
		if err := dec.Decode(&v); err != nil || dec.More() {
			e.t.Fatalf("stdout is not a single JSON value (err %v): %q", err, out.stdout)
		}
	}
	return out
}

func (o outcome) cniError(t *testing.T) cniError {
	t.Helper()
	if o.exitCode == 0 {
		t.Fatalf("plugin succeeded, want an error; stdout %s", o.stdout)
	}
	var ce cniError
	if err := json.Unmarshal(o.stdout, &ce); err != nil {
		t.Fatalf("error output is not CNI error JSON: %v: %q", err, o.stdout)
	}
	return ce
}

// prevResultJSON is a primary plugin's result with two interfaces, IPs
// pointing at them by index, routes and DNS, in the given version's format.
func prevResultJSON(version string) map[string]any {
	switch version {
	case "0.3.0", "0.3.1", "0.4.0":
		return map[string]any{
			"cniVersion": version,
			"interfaces": []any{
				map[string]any{"name": "slbr0", "mac": "0a:58:0a:01:00:01"},
				map[string]any{"name": "eth0", "mac": "0a:58:0a:01:00:05", "sandbox": "/var/run/netns/x"},
			},
			"ips": []any{
				map[string]any{"version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
				map[string]any{"version": "6", "address": "fd00:1::5/64", "gateway": "fd00:1::1", "interface": 1},
			},
			"routes": []any{map[string]any{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}},
			"dns":    map[string]any{"nameservers": []any{"10.96.0.10"}, "search": []any{"svc.cluster.local"}},
		}
	default:
		return map[string]any{
			"cniVersion": version,
			"interfaces": []any{
				map[string]any{"name": "slbr0", "mac": "0a:58:0a:01:00:01"},
				map[string]any{"name": "eth0", "mac": "0a:58:0a:01:00:05", "sandbox": "/var/run/netns/x"},
			},
			"ips": []any{
				map[string]any{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
				map[string]any{"address": "fd00:1::5/64", "gateway": "fd00:1::1", "interface": 1},
			},
			"routes": []any{map[string]any{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}},
			"dns":    map[string]any{"nameservers": []any{"10.96.0.10"}, "search": []any{"svc.cluster.local"}},
		}
	}
}

func (e *env) stdin(extra map[string]any) []byte {
	e.t.Helper()
	c := e.pluginConf(extra)
	c["cniVersion"] = e.version
	c["name"] = e.network
	raw, err := json.Marshal(c)
	if err != nil {
		e.t.Fatal(err)
	}
	return raw
}

// addrsIn lists the IPv4 addresses configured on ifname inside n.
func addrsIn(t *testing.T, n ns.NetNS, ifname string) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	err := n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
				out = append(out, ip)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("addresses of %s: %v", ifname, err)
	}
	return out
}

func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		t.Fatalf("unmarshal %q: %v", a, err)
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		t.Fatalf("unmarshal %q: %v", b, err)
	}
	na, _ := json.Marshal(va)
	nb, _ := json.Marshal(vb)
	return bytes.Equal(na, nb)
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func addrOf(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a.Unmap()
}

func asCNIError(err error, target **types.Error) bool { return errors.As(err, target) }
