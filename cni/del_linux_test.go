package cni

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/vishvananda/netlink"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/internal/testenv"
)

// TestDelAfterUninstall installs the real sidelane-cni (make build) into a
// bridge primary, adds pods through libcni (as containerd and CRI-O do)
// with the real agent behind it, uninstalls, and checks that DEL of those
// pods still succeeds both ways runtimes tear down: from the current
// config (containerd) and from the config cached at ADD (CRI-O), even with
// the agent gone.
func TestDelAfterUninstall(t *testing.T) {
	testenv.Privileged(t)
	sidelaneBin := testenv.SidelaneBin(t)
	testenv.RequireTool(t, "bridge")
	testenv.RequireTool(t, "host-local")

	dir := t.TempDir()
	conf, bin, cache := filepath.Join(dir, "net.d"), filepath.Join(dir, "bin"), filepath.Join(dir, "cache")
	if err := os.MkdirAll(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	bridge := testenv.UniqueName("sli")
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(bridge); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	primary := fmt.Sprintf(`{"cniVersion":"1.0.0","name":%q,"type":"bridge","bridge":%q,"isGateway":true,
		"ipam":{"type":"host-local","ranges":[[{"subnet":"10.%d.%d.0/24"}]],"dataDir":%q}}`,
		testenv.UniqueName("sl-inst-"), bridge, 200+rand.IntN(8), rand.IntN(256), filepath.Join(dir, "ipam"))
	if err := os.WriteFile(filepath.Join(conf, "10-bridge.conf"), []byte(primary), 0o644); err != nil {
		t.Fatal(err)
	}

	// The real agent, in process, on a socket of this test.
	socket := filepath.Join(dir, "agent", "cni.sock")
	a, err := agent.New(agent.Config{Socket: socket, StateDir: filepath.Join(dir, "agent"), Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	actx, stopAgent := context.WithCancel(context.Background())
	agentDone := make(chan error, 1)
	go func() { agentDone <- a.Run(actx) }()
	t.Cleanup(func() { stopAgent(); <-agentDone; agentDone <- nil })
	eventually(t, "agent ready", func() bool { ok, _ := a.Ready(); return ok })

	inst, err := New(Config{ConfDir: conf, BinDir: bin, SourceBinary: filepath.Join(sidelaneBin, PluginType),
		Options: Options{Entry: Entry{AgentSocket: socket, AgentTimeout: "2s"}}, CNICacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := inst.Sync(); err != nil {
		t.Fatal(err)
	}
	installed := runtimeConfig(t, conf)
	if !installed.plugins(PluginType) {
		t.Fatalf("runtime config %s does not chain sidelane-cni", installed.file)
	}

	cniConf := libcni.NewCNIConfigWithCacheDir([]string{bin, testenv.ToolBin(t)}, cache, nil)
	ctx := context.Background()
	pods := map[string]*libcni.RuntimeConf{}
	for _, id := range []string{"crio-pod", "containerd-pod", "agent-gone-pod"} {
		n := testenv.NewNS(t)
		rt := &libcni.RuntimeConf{ContainerID: id + "-" + testenv.UniqueName(""), NetNS: n.Path(), IfName: "eth0",
			Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", id}}}
		if _, err := cniConf.AddNetworkList(ctx, installed.list, rt); err != nil {
			t.Fatalf("ADD %s: %v", id, err)
		}
		pods[id] = rt
	}
	if n := len(a.Store().List()); n != 3 {
		t.Fatalf("agent has %d attachments after 3 ADDs", n)
	}

	if err := inst.Uninstall(); err != nil {
		t.Fatal(err)
	}
	after := runtimeConfig(t, conf)
	if after.plugins(PluginType) {
		t.Fatalf("%s still chains sidelane-cni after uninstall", after.file)
	}
	if _, err := os.Stat(filepath.Join(bin, PluginType)); err != nil {
		t.Fatalf("binary removed while cached attachments still name it: %v", err)
	}

	// CRI-O tears down from the config cached at ADD, which runs
	// sidelane-cni's DEL; the running agent forgets the pod.
	cached, rt, err := cniConf.GetNetworkListCachedConfig(after.list, pods["crio-pod"])
	if err != nil || cached == nil {
		t.Fatalf("cached config: %v", err)
	}
	cachedList, err := libcni.ConfListFromBytes(cached)
	if err != nil {
		t.Fatal(err)
	}
	if err := cniConf.DelNetworkList(ctx, cachedList, rt); err != nil {
		t.Fatalf("DEL from the cached config after uninstall: %v", err)
	}
	for _, e := range a.Store().List() {
		if e.ContainerID == pods["crio-pod"].ContainerID {
			t.Error("agent still holds the pod after its DEL")
		}
	}

	// containerd tears down from the current config (no sidelane).
	if err := cniConf.DelNetworkList(ctx, after.list, pods["containerd-pod"]); err != nil {
		t.Fatalf("DEL from the current config after uninstall: %v", err)
	}

	// With the agent gone too, sidelane-cni's DEL still succeeds.
	stopAgent()
	<-agentDone
	agentDone <- nil
	cached, rt, err = cniConf.GetNetworkListCachedConfig(after.list, pods["agent-gone-pod"])
	if err != nil || cached == nil {
		t.Fatalf("cached config: %v", err)
	}
	cachedList, _ = libcni.ConfListFromBytes(cached)
	if err := cniConf.DelNetworkList(ctx, cachedList, rt); err != nil {
		t.Fatalf("DEL with the agent gone after uninstall: %v", err)
	}

	// No cached attachment names sidelane-cni any more: the binary goes.
	if err := inst.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(bin, PluginType)); !os.IsNotExist(err) {
		t.Errorf("binary still there once no attachment needs it: %v", err)
	}
}

type runtimeConf struct {
	file string
	list *libcni.NetworkConfigList
}

// runtimeConfig loads the config a runtime would use from dir.
func runtimeConfig(t *testing.T, dir string) runtimeConf {
	t.Helper()
	files, err := readConfDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	f, _, _, err := SelectPrimary(files, "")
	if err != nil {
		t.Fatal(err)
	}
	var list *libcni.NetworkConfigList
	if filepath.Ext(f.Name) == ".conflist" {
		list, err = libcni.ConfListFromBytes(f.Data)
	} else {
		var pc *libcni.PluginConfig
		if pc, err = libcni.ConfFromBytes(f.Data); err == nil {
			list, err = libcni.ConfListFromConf(pc)
		}
	}
	if err != nil {
		t.Fatalf("load %s: %v", f.Name, err)
	}
	return runtimeConf{file: f.Name, list: list}
}

func (r runtimeConf) plugins(typ string) bool {
	for _, p := range r.list.Plugins {
		if p.Network.Type == typ {
			return true
		}
	}
	return false
}
