package conformance

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	gocni "github.com/containerd/go-cni"
	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	noopdebug "github.com/containernetworking/cni/plugins/test/noop/debug"

	"github.com/sidelane/sidelane/internal/testenv"
)

func atLeast(t *testing.T, v, min string) bool {
	ok, err := version.GreaterThanOrEqualTo(v, min)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestCNI runs every CNI conformance case for every supported spec version.
func TestCNI(t *testing.T) {
	for _, v := range cniVersions {
		t.Run(v, func(t *testing.T) {
			e := newEnv(t, v)
			t.Run("version", e.testVersion)
			t.Run("error-json", e.testErrorJSON)
			t.Run("add-needs-prevresult", e.testAddWithoutPrevResult)
			t.Run("prevresult-passthrough", e.testPassthrough)
			t.Run("chain-noop-accepts", e.testChainNoop)
			t.Run("go-cni-eth0", e.testGoCNI)
			t.Run("del-no-prevresult", e.testDelNoPrevResult)
			t.Run("del-no-netns", e.testDelNoNetns)
			t.Run("del-never-added", e.testDelNeverAdded)
			t.Run("del-twice", e.testDelTwice)
			t.Run("del-agent-down", e.testDelAgentDown)
			t.Run("cni-args", e.testCNIArgs)
			t.Run("unknown-config-fields", e.testUnknownFields)
			t.Run("fail-policy", e.testFailPolicy)
			t.Run("parallel-20", e.testParallel)
			if atLeast(t, v, "0.4.0") {
				t.Run("check", e.testCheck)
			}
			if atLeast(t, v, "1.1.0") {
				t.Run("status", e.testStatus)
				t.Run("gc", e.testGC)
			}
		})
	}
}

// TestUnsupportedVersion: versions the plugin does not speak get code 1.
func TestUnsupportedVersion(t *testing.T) {
	for _, v := range []string{"0.1.0", "0.2.0", "2.0.0"} {
		t.Run(v, func(t *testing.T) {
			e := newEnv(t, v)
			out := e.invoke(invocation{command: "ADD", containerID: "c", netns: "/var/run/netns/none", stdin: e.stdin(map[string]any{"prevResult": prevResultJSON("1.0.0")})})
			ce := out.cniError(t)
			if ce.Code != types.ErrIncompatibleCNIVersion {
				t.Fatalf("code = %d (%s), want 1", ce.Code, ce.Msg)
			}
		})
	}
}

func (e *env) testVersion(t *testing.T) {
	out := e.invoke(invocation{command: "VERSION", stdin: []byte(fmt.Sprintf(`{"cniVersion":%q}`, e.version))})
	if out.exitCode != 0 {
		t.Fatalf("VERSION failed: %s %s", out.stdout, out.stderr)
	}
	var info struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(out.stdout, &info); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(info.SupportedVersions, cniVersions) {
		t.Fatalf("supportedVersions = %v, want %v", info.SupportedVersions, cniVersions)
	}
	if info.CNIVersion == "" {
		t.Fatal("VERSION output has no cniVersion")
	}
}

func (e *env) testErrorJSON(t *testing.T) {
	out := e.invoke(invocation{command: "ADD", containerID: "c", netns: "/var/run/netns/none", stdin: e.stdin(map[string]any{"failPolicy": "sometimes"})})
	ce := out.cniError(t)
	if out.exitCode != 1 {
		t.Errorf("exit code = %d, want 1", out.exitCode)
	}
	if ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Msg, "failPolicy") {
		t.Errorf("error = %+v, want code 7 naming failPolicy", ce)
	}
	if ce.CNIVersion != e.version {
		t.Errorf("error cniVersion = %q, want %q", ce.CNIVersion, e.version)
	}
}

func (e *env) testAddWithoutPrevResult(t *testing.T) {
	n := testenv.NewNS(t)
	out := e.invoke(invocation{command: "ADD", containerID: "noprev", netns: n.Path(), stdin: e.stdin(nil)})
	ce := out.cniError(t)
	if ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Msg, "prevResult") {
		t.Fatalf("error = %+v, want code 7 about prevResult", ce)
	}
	if e.agent.has(e.network, "noprev") {
		t.Fatal("agent recorded a pod whose ADD failed")
	}
}

func (e *env) testPassthrough(t *testing.T) {
	n := testenv.NewNS(t)
	prev := prevResultJSON(e.version)
	out := e.invoke(invocation{command: "ADD", containerID: "pass", netns: n.Path(), args: "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
		stdin: e.stdin(map[string]any{"prevResult": prev})})
	if out.exitCode != 0 {
		t.Fatalf("ADD failed: %s %s", out.stdout, out.stderr)
	}
	if !jsonEqual(t, out.stdout, mustJSON(t, prev)) {
		t.Fatalf("result differs from prevResult:\n got %s\nwant %s", out.stdout, mustJSON(t, prev))
	}
	if len(out.stderr) == 0 {
		t.Error("no logs on stderr at logLevel debug (stdout must carry only the result)")
	}
	if !e.agent.has(e.network, "pass") {
		t.Fatal("agent has no record of the pod")
	}
	for _, en := range e.agent.entries() {
		if en.ContainerID == "pass" && (len(en.IPs) != 2 || en.IPs[0].String() != "10.1.0.5/24" || en.PodName != "p" || en.Netns != n.Path()) {
			t.Fatalf("agent record = %+v", en)
		}
	}
	e.invoke(invocation{command: "DEL", containerID: "pass", netns: n.Path(), stdin: e.stdin(nil)})
}

func (e *env) testChainNoop(t *testing.T) {
	n := testenv.NewNS(t)
	debugFile := filepath.Join(t.TempDir(), "noop.json")
	if err := (&noopdebug.Debug{ReportResult: "PASSTHROUGH"}).WriteDebug(debugFile); err != nil {
		t.Fatal(err)
	}
	list := e.confList(nil, map[string]any{"type": "noop", "debugFile": debugFile})
	rt := runtimeConf("noop", n, "noop")
	res, err := e.cni.AddNetworkList(context.Background(), list, rt)
	if err != nil {
		t.Fatalf("ADD bridge -> sidelane -> noop: %v", err)
	}
	if res.Version() != e.version {
		t.Fatalf("result version %s, want %s", res.Version(), e.version)
	}
	// noop saw our output as its prevResult and parsed it as this version.
	d, err := noopdebug.ReadDebug(debugFile)
	if err != nil {
		t.Fatal(err)
	}
	var seen struct {
		PrevResult map[string]any `json:"prevResult"`
	}
	if err := json.Unmarshal(d.CmdArgs.StdinData, &seen); err != nil {
		t.Fatal(err)
	}
	if seen.PrevResult["cniVersion"] != e.version {
		t.Fatalf("noop's prevResult version = %v, want %s", seen.PrevResult["cniVersion"], e.version)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if len(cur.IPs) != 1 || !e.subnet.Contains(addrOf(t, cur.IPs[0].Address.IP.String())) {
		t.Fatalf("result IPs = %v, want one in %s", cur.IPs, e.subnet)
	}
	if idx := cur.IPs[0].Interface; idx == nil || cur.Interfaces[*idx].Name != "eth0" {
		t.Fatalf("IP interface index does not point at eth0: %+v", cur)
	}
	if err := (&noopdebug.Debug{}).WriteDebug(debugFile); err != nil {
		t.Fatal(err)
	}
	if err := e.cni.DelNetworkList(context.Background(), list, rt); err != nil {
		t.Fatalf("DEL: %v", err)
	}
}

func (e *env) testGoCNI(t *testing.T) {
	n := testenv.NewNS(t)
	// As containerd does: the conf dir's first file is the default network
	// (eth0), plus the loopback network.
	confDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(confDir, "10-conformance.conflist"), e.confList(nil).Bytes, 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := gocni.New(gocni.WithPluginDir(e.pluginDirs), gocni.WithPluginConfDir(confDir), gocni.WithInterfacePrefix("eth"), gocni.WithMinNetworkCount(2))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Load(gocni.WithLoNetwork, gocni.WithDefaultConf); err != nil {
		t.Fatalf("go-cni load: %v", err)
	}
	labels := map[string]string{"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "conformance", "K8S_POD_NAME": "gocni", "K8S_POD_UID": "u"}
	res, err := c.Setup(context.Background(), "gocni", n.Path(), gocni.WithLabels(labels))
	if err != nil {
		t.Fatalf("go-cni setup: %v", err)
	}
	eth0, ok := res.Interfaces["eth0"]
	if !ok || len(eth0.IPConfigs) == 0 {
		t.Fatalf("go-cni result has no IP on eth0: %+v", res.Interfaces)
	}
	ip := addrOf(t, eth0.IPConfigs[0].IP.String())
	if !e.subnet.Contains(ip) {
		t.Fatalf("eth0 IP %s not in %s", ip, e.subnet)
	}
	if !slices.Contains(addrsIn(t, n, "eth0"), ip) {
		t.Fatalf("eth0 in the netns does not carry %s", ip)
	}
	if !e.agent.has(e.network, "gocni") {
		t.Fatal("agent has no record of the go-cni pod")
	}
	if err := c.Remove(context.Background(), "gocni", n.Path(), gocni.WithLabels(labels)); err != nil {
		t.Fatalf("go-cni remove: %v", err)
	}
	if e.agent.has(e.network, "gocni") {
		t.Fatal("agent kept the pod after go-cni remove")
	}
}

// addAttachment adds one pod through the full chain with libcni.
func (e *env) addAttachment(t *testing.T, id string) (*libcni.NetworkConfigList, *libcni.RuntimeConf) {
	t.Helper()
	n := testenv.NewNS(t)
	list := e.confList(nil)
	rt := runtimeConf(id, n, id)
	if _, err := e.cni.AddNetworkList(context.Background(), list, rt); err != nil {
		t.Fatalf("ADD %s: %v", id, err)
	}
	return list, rt
}

func (e *env) testDelNoPrevResult(t *testing.T) {
	list, rt := e.addAttachment(t, "delnoprev")
	out := e.invoke(invocation{command: "DEL", containerID: rt.ContainerID, netns: rt.NetNS, stdin: e.stdin(nil)})
	if out.exitCode != 0 {
		t.Fatalf("DEL without prevResult failed: %s", out.stdout)
	}
	if e.agent.has(e.network, rt.ContainerID) {
		t.Fatal("agent kept the attachment")
	}
	_ = e.cni.DelNetworkList(context.Background(), list, rt)
}

func (e *env) testDelNoNetns(t *testing.T) {
	list, rt := e.addAttachment(t, "delnonetns")
	// First with CNI_NETNS empty, then with a path that no longer exists.
	for _, netns := range []string{"", "/var/run/netns/" + testenv.UniqueName("gone-")} {
		out := e.invoke(invocation{command: "DEL", containerID: rt.ContainerID, netns: netns, stdin: e.stdin(nil)})
		if out.exitCode != 0 {
			t.Fatalf("DEL with netns %q failed: %s", netns, out.stdout)
		}
	}
	if e.agent.has(e.network, rt.ContainerID) {
		t.Fatal("agent kept the attachment")
	}
	_ = e.cni.DelNetworkList(context.Background(), list, rt)
}

func (e *env) testDelNeverAdded(t *testing.T) {
	out := e.invoke(invocation{command: "DEL", containerID: "never", netns: "", stdin: e.stdin(nil)})
	if out.exitCode != 0 {
		t.Fatalf("DEL of an unknown container failed: %s", out.stdout)
	}
}

func (e *env) testDelTwice(t *testing.T) {
	list, rt := e.addAttachment(t, "deltwice")
	for i := range 2 {
		if err := e.cni.DelNetworkList(context.Background(), list, rt); err != nil {
			t.Fatalf("DEL #%d: %v", i+1, err)
		}
	}
	if e.agent.has(e.network, rt.ContainerID) {
		t.Fatal("agent kept the attachment")
	}
}

func (e *env) testDelAgentDown(t *testing.T) {
	list, rt := e.addAttachment(t, "deldown")
	e.agent.stop()
	defer e.agent.start()
	if err := e.cni.DelNetworkList(context.Background(), list, rt); err != nil {
		t.Fatalf("DEL with the agent down: %v", err)
	}
}

func (e *env) testCNIArgs(t *testing.T) {
	n := testenv.NewNS(t)
	stdin := e.stdin(map[string]any{"prevResult": prevResultJSON(e.version)})
	out := e.invoke(invocation{command: "ADD", containerID: "args1", netns: n.Path(), stdin: stdin,
		args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-1;K8S_POD_UID=abc;SOMETHING_ELSE=x"})
	if out.exitCode != 0 {
		t.Fatalf("ADD with IgnoreUnknown: %s", out.stdout)
	}
	found := false
	for _, en := range e.agent.entries() {
		if en.ContainerID == "args1" {
			found = en.PodNamespace == "team-a" && en.PodName == "web-1" && en.PodUID == "abc"
		}
	}
	if !found {
		t.Fatal("agent did not get the pod identity from CNI_ARGS")
	}
	out = e.invoke(invocation{command: "ADD", containerID: "args2", netns: n.Path(), stdin: stdin,
		args: "K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-2;SOMETHING_ELSE=x"})
	ce := out.cniError(t)
	if ce.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(ce.Msg, "SOMETHING_ELSE") {
		t.Fatalf("unknown CNI_ARGS key without IgnoreUnknown: %+v, want code 4 naming the key", ce)
	}
	e.invoke(invocation{command: "DEL", containerID: "args1", netns: n.Path(), stdin: e.stdin(nil)})
}

func (e *env) testUnknownFields(t *testing.T) {
	n := testenv.NewNS(t)
	out := e.invoke(invocation{command: "ADD", containerID: "unknown", netns: n.Path(), stdin: e.stdin(map[string]any{
		"prevResult": prevResultJSON(e.version), "fromTheFuture": map[string]any{"x": 1}, "runtimeConfig": map[string]any{"portMappings": []any{}},
	})})
	if out.exitCode != 0 {
		t.Fatalf("ADD with unknown fields failed: %s", out.stdout)
	}
	e.invoke(invocation{command: "DEL", containerID: "unknown", netns: n.Path(), stdin: e.stdin(nil)})
}

func (e *env) testFailPolicy(t *testing.T) {
	n := testenv.NewNS(t)
	down := filepath.Join(t.TempDir(), "nobody-listens.sock")
	prev := prevResultJSON(e.version)
	out := e.invoke(invocation{command: "ADD", containerID: "fp", netns: n.Path(), stdin: e.stdin(map[string]any{"prevResult": prev, "agentSocket": down})})
	ce := out.cniError(t)
	if ce.Code != types.ErrTryAgainLater || !strings.Contains(ce.Msg, down) {
		t.Fatalf("closed, agent down: %+v, want code 11 naming %s", ce, down)
	}
	out = e.invoke(invocation{command: "ADD", containerID: "fp", netns: n.Path(), stdin: e.stdin(map[string]any{"prevResult": prev, "agentSocket": down, "failPolicy": "open"})})
	if out.exitCode != 0 || !jsonEqual(t, out.stdout, mustJSON(t, prev)) {
		t.Fatalf("open, agent down: exit %d, stdout %s", out.exitCode, out.stdout)
	}
	if !strings.Contains(string(out.stderr), "failPolicy open") {
		t.Errorf("open policy did not warn on stderr: %s", out.stderr)
	}
}

func (e *env) testParallel(t *testing.T) {
	list := e.confList(nil)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := range 20 {
		n := testenv.NewNS(t)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rt := runtimeConf(fmt.Sprintf("par%02d", i), n, fmt.Sprintf("par-%d", i))
			if _, err := e.cni.AddNetworkList(context.Background(), list, rt); err != nil {
				errs <- fmt.Errorf("ADD %s: %w", rt.ContainerID, err)
				return
			}
			if err := e.cni.DelNetworkList(context.Background(), list, rt); err != nil {
				errs <- fmt.Errorf("DEL %s: %w", rt.ContainerID, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, en := range e.agent.entries() {
		if strings.HasPrefix(en.ContainerID, "par") {
			t.Errorf("attachment %s left in the agent after DEL", en.ContainerID)
		}
	}
}

func (e *env) testCheck(t *testing.T) {
	list, rt := e.addAttachment(t, "check")
	defer e.cni.DelNetworkList(context.Background(), list, rt)
	if err := e.cni.CheckNetworkList(context.Background(), list, rt); err != nil {
		t.Fatalf("CHECK after ADD: %v", err)
	}
	e.agent.forget(e.network, rt.ContainerID)
	err := e.cni.CheckNetworkList(context.Background(), list, rt)
	if err == nil || !strings.Contains(err.Error(), "no state for attachment") {
		t.Fatalf("CHECK after the agent lost the pod: %v, want a clear failure", err)
	}
}

func (e *env) testStatus(t *testing.T) {
	report := e.confList(map[string]any{"statusPolicy": "agent"})
	ignore := e.confList(nil)
	if err := e.cni.GetStatusNetworkList(context.Background(), report); err != nil {
		t.Fatalf("STATUS with the agent up: %v", err)
	}
	e.agent.stop()
	defer e.agent.start()
	err := e.cni.GetStatusNetworkList(context.Background(), report)
	var ce *types.Error
	if !asCNIError(err, &ce) || ce.Code != 50 || !strings.Contains(ce.Msg, e.agent.socket) {
		t.Fatalf("STATUS with the agent down: %v, want code 50 naming the socket", err)
	}
	if err := e.cni.GetStatusNetworkList(context.Background(), ignore); err != nil {
		t.Fatalf("STATUS with statusPolicy ignore and the agent down: %v", err)
	}
}

func (e *env) testGC(t *testing.T) {
	list, keep := e.addAttachment(t, "gc-keep")
	_, stale1 := e.addAttachment(t, "gc-stale1")
	_, stale2 := e.addAttachment(t, "gc-stale2")
	// An attachment of another network must survive this network's GC.
	other := *e
	other.network = testenv.UniqueName("slother-")
	olist, ort := other.addAttachment(t, "gc-other")
	defer other.cni.DelNetworkList(context.Background(), olist, ort)

	err := e.cni.GCNetworkList(context.Background(), list, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: keep.ContainerID, IfName: "eth0"}}})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	if !e.agent.has(e.network, keep.ContainerID) {
		t.Error("GC removed a valid attachment")
	}
	for _, rt := range []*libcni.RuntimeConf{stale1, stale2} {
		if e.agent.has(e.network, rt.ContainerID) {
			t.Errorf("GC kept stale attachment %s", rt.ContainerID)
		}
	}
	if !e.agent.has(other.network, ort.ContainerID) {
		t.Error("GC of one network removed another network's attachment")
	}
	_ = e.cni.DelNetworkList(context.Background(), list, keep)
}
