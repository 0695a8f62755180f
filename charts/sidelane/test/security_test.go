package charttest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/cni"
	"github.com/sidelane/sidelane/internal/testenv"
)

// The agent's run dir (cni.sock, state.json), as the templates name it.
const runDir = "/var/run/sidelane"

// object is the part of a rendered manifest these tests read.
type object struct {
	Kind     string `json:"kind"`
	Metadata struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Data map[string]string `json:"data"`
	Spec struct {
		Template struct {
			Spec struct {
				Containers []container `json:"containers"`
				Volumes    []struct {
					Name     string `json:"name"`
					HostPath *struct {
						Path string `json:"path"`
					} `json:"hostPath"`
				} `json:"volumes"`
			} `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

type container struct {
	Name           string   `json:"name"`
	Args           []string `json:"args"`
	ReadinessProbe *struct {
		HTTPGet struct {
			Host string `json:"host"`
			Port any    `json:"port"` // a number, or a port name
		} `json:"httpGet"`
	} `json:"readinessProbe"`
	VolumeMounts []struct {
		Name      string `json:"name"`
		MountPath string `json:"mountPath"`
	} `json:"volumeMounts"`
}

// rendered is one value set's manifests.
type rendered []object

func renderObjects(t *testing.T, set string) rendered {
	t.Helper()
	out, err := render(t, valueSets(t)[set])
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, out)
	}
	var objs rendered
	for doc := range strings.SplitSeq(string(out), "\n---\n") {
		var o object
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatalf("parse rendered manifest: %v\n%s", err, doc)
		}
		if o.Kind != "" {
			objs = append(objs, o)
		}
	}
	return objs
}

func (r rendered) find(t *testing.T, kind, component string) object {
	t.Helper()
	for _, o := range r {
		if o.Kind == kind && (component == "" || o.Metadata.Labels["app.kubernetes.io/component"] == component) {
			return o
		}
	}
	t.Fatalf("no %s with component %q rendered", kind, component)
	return object{}
}

func (r rendered) configData(t *testing.T) map[string]string {
	t.Helper()
	for _, o := range r {
		if o.Kind == "ConfigMap" && strings.HasSuffix(o.Metadata.Name, "-config") {
			return o.Data
		}
	}
	t.Fatal("no settings ConfigMap rendered")
	return nil
}

func (o object) container(t *testing.T, name string) container {
	t.Helper()
	for _, c := range o.Spec.Template.Spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("%s has no container %s", o.Metadata.Name, name)
	return container{}
}

func within(p, dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }

// TestNodeProxyReachesOnlyXDS: the node proxy (Envoy as root, serving
// traffic from every per-node pod) mounts the agent's xDS socket's own
// dir and nothing of the agent's run dir: with cni.sock in reach it could
// enroll the host netns, un-capture every pod (GC with an empty list) and
// read pod state. It fails when a node-proxy volume or mount reaches the
// run dir, or when the agent's xDS socket is not in the one dir it mounts.
func TestNodeProxyReachesOnlyXDS(t *testing.T) {
	objs := renderObjects(t, "node-proxy")
	np := objs.find(t, "DaemonSet", "node-proxy")
	hostPaths := map[string]string{}
	for _, v := range np.Spec.Template.Spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		hostPaths[v.Name] = v.HostPath.Path
		if within(v.HostPath.Path, runDir) || within(runDir, v.HostPath.Path) {
			t.Errorf("node proxy volume %s mounts host path %s, which reaches the agent's run dir %s", v.Name, v.HostPath.Path, runDir)
		}
	}
	envoy := np.container(t, "envoy")
	for _, m := range envoy.VolumeMounts {
		if within(m.MountPath, runDir) {
			t.Errorf("node proxy mounts %s at %s, inside the agent's run dir", m.Name, m.MountPath)
		}
	}
	var xdsSocket string
	for _, a := range objs.find(t, "DaemonSet", "agent").container(t, "agent").Args {
		if v, ok := strings.CutPrefix(a, "--xds-socket="); ok {
			xdsSocket = v
		}
	}
	if xdsSocket == "" {
		t.Fatal("agent serves no --xds-socket with the node proxy enabled")
	}
	mounted := false
	for _, m := range envoy.VolumeMounts {
		if m.MountPath == path.Dir(xdsSocket) && hostPaths[m.Name] == path.Dir(xdsSocket) {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("node proxy does not mount the xDS socket's dir %s from the host", path.Dir(xdsSocket))
	}

	// A socket in the run dir is refused, by the schema and by the
	// template (for a value the schema's pattern would let through).
	for _, sock := range []string{runDir + "/xds.sock", runDir + "/sub/xds.sock"} {
		out, err := render(t, valueSets(t)["node-proxy"], "--set", "nodeProxy.xdsSocket="+sock)
		if err == nil || !strings.Contains(string(out), "xdsSocket") {
			t.Errorf("nodeProxy.xdsSocket=%s: err=%v, want refused naming xdsSocket (output %d bytes)", sock, err, len(out))
		}
	}
}

// TestMetricsOnLoopbackByDefault: /metrics names the node's pods; by
// default the agent serves it (with /readyz, /healthz) on 127.0.0.1 only,
// as the README says, and the kubelet probes it there.
func TestMetricsOnLoopbackByDefault(t *testing.T) {
	objs := renderObjects(t, "default")
	addr := objs.configData(t)["AGENT_HTTP_ADDR"]
	if !strings.HasPrefix(addr, "127.0.0.1:") {
		t.Errorf("AGENT_HTTP_ADDR = %q, want 127.0.0.1:<port>", addr)
	}
	probe := objs.find(t, "DaemonSet", "agent").container(t, "agent").ReadinessProbe
	if probe == nil || probe.HTTPGet.Host != "127.0.0.1" {
		t.Errorf("readiness probe = %+v, want it on 127.0.0.1 where the agent listens", probe)
	}
}

// installCNICommand is the chart's install-cni container command with its
// $(VAR)s filled from the ConfigMap, and host paths mapped into dir.
func installCNICommand(t *testing.T, objs rendered, dir string, paths map[string]string) []string {
	t.Helper()
	data := objs.configData(t)
	ic := objs.find(t, "DaemonSet", "agent").container(t, "install-cni")
	ref := regexp.MustCompile(`\$\(([A-Z_]+)\)`)
	var args []string
	for _, a := range ic.Args {
		a = ref.ReplaceAllStringFunc(a, func(m string) string {
			v, ok := data[m[2:len(m)-1]]
			if !ok {
				t.Fatalf("install-cni arg %s names %s, which the ConfigMap lacks", a, m)
			}
			return v
		})
		if k, v, ok := strings.Cut(a, "="); ok {
			if to, mapped := paths[v]; mapped {
				a = k + "=" + to
			} else if strings.HasPrefix(v, "/") {
				t.Fatalf("install-cni arg %s names a host path this test does not map", a)
			}
		}
		args = append(args, a)
	}
	return args
}

// TestRolloutKeepsCaptureClosed replays a DaemonSet roll on one node with
// the chart's default install-cni flags: install-cni chains sidelane, the
// old pod gets SIGTERM (agent and install-cni gone), a pod is created in
// the gap, then the new agent comes up. The entry must stay in place
// through the SIGTERM, so the gap's pod fails closed (CNI code 11, the
// runtime retries) instead of starting without sidelane, and its retry
// reaches the new agent. With cleanupOnExit true (the old default) the
// entry went at SIGTERM and the gap's pod was set up by the primary alone,
// uncaptured for life: no reconcile ever sees it.
func TestRolloutKeepsCaptureClosed(t *testing.T) {
	bin := testenv.SidelaneBin(t)
	objs := renderObjects(t, "default")
	dir := t.TempDir()
	conf, cniBin, cache := filepath.Join(dir, "net.d"), filepath.Join(dir, "bin"), filepath.Join(dir, "cache")
	agentDir := filepath.Join(dir, "agent")
	socket := filepath.Join(agentDir, "cni.sock")
	for _, d := range []string{conf, cniBin, cache, agentDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// A primary that hands out one address, so libcni runs the chain as
	// a runtime would without needing a netns.
	primary := "#!/bin/sh\ncat >/dev/null\n" +
		`[ "$CNI_COMMAND" = ADD ] && echo '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"'"$CNI_NETNS"'"}],"ips":[{"address":"10.99.0.2/24","interface":0}]}'` +
		"\nexit 0\n"
	if err := os.WriteFile(filepath.Join(cniBin, "fake-primary"), []byte(primary), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(conf, "10-primary.conflist"), []byte(`{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"fake-primary"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	args := installCNICommand(t, objs, dir, map[string]string{
		"/host/etc/cni/net.d":         conf,
		"/host/opt/cni/bin":           cniBin,
		"/host/var/lib/cni":           cache,
		"/usr/local/bin/sidelane-cni": filepath.Join(bin, cni.PluginType),
		runDir + "/cni.sock":          socket,
		runDir + "/kubeconfig":        filepath.Join(agentDir, "kubeconfig"),
	})

	// 1. The old pod's install-cni chains sidelane.
	cmd := exec.Command(filepath.Join(bin, "sidelane"), args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")} // not in a pod: no API server
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-done
		}
	})
	chained := func() *libcni.NetworkConfigList {
		data, err := os.ReadFile(filepath.Join(conf, "10-primary.conflist"))
		if err != nil {
			t.Fatal(err)
		}
		l, err := libcni.ConfListFromBytes(data)
		if err != nil {
			t.Fatalf("conflist: %v\n%s", err, data)
		}
		for _, p := range l.Plugins {
			if p.Network.Type == cni.PluginType {
				return l
			}
		}
		return nil
	}
	deadline := time.Now().Add(20 * time.Second)
	for chained() == nil {
		if time.Now().After(deadline) {
			t.Fatalf("install-cni did not chain sidelane in 20s\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}

	// 2. The roll terminates the old pod.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("install-cni exit: %v\n%s", err, logs.String())
	}
	list := chained()
	if list == nil {
		t.Fatalf("sidelane's entry removed at SIGTERM with the chart's defaults (%s): pods made before the new pod re-adds it start uncaptured\n%s",
			strings.Join(args, " "), logs.String())
	}

	// 3. A pod created in the gap fails closed: code 11, so the runtime
	// retries it, never set up without sidelane.
	cniConf := libcni.NewCNIConfigWithCacheDir([]string{cniBin}, filepath.Join(dir, "libcni-cache"), nil)
	rt := &libcni.RuntimeConf{ContainerID: "gap-pod", NetNS: "/var/run/netns/" + testenv.UniqueName("gap"), IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", "gap-pod"}}}
	_, err := cniConf.AddNetworkList(context.Background(), list, rt)
	var ce *types.Error
	if !errors.As(err, &ce) || ce.Code != types.ErrTryAgainLater || !strings.Contains(ce.Msg, socket) {
		t.Fatalf("ADD with the agent down: %v, want CNI code 11 naming %s", err, socket)
	}

	// 4. The new agent is up: the runtime's retry reaches it.
	a, err := agent.New(agent.Config{Socket: socket, StateDir: agentDir, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	agentDone := make(chan error, 1)
	go func() { agentDone <- a.Run(ctx) }()
	t.Cleanup(func() { stop(); <-agentDone })
	for ready, _ := a.Ready(); !ready; ready, _ = a.Ready() {
		if time.Now().After(deadline.Add(10 * time.Second)) {
			t.Fatal("agent not ready")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := cniConf.AddNetworkList(context.Background(), list, rt); err != nil {
		t.Fatalf("retried ADD with the new agent up: %v", err)
	}
	var got []string
	for _, e := range a.Store().List() {
		got = append(got, fmt.Sprintf("%s/%s %s", e.PodNamespace, e.PodName, e.Network))
	}
	if strings.Join(got, ",") != "default/gap-pod podnet" {
		t.Fatalf("new agent holds %v, want the gap's pod", got)
	}
}
