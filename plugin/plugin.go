// Package plugin is sidelane's chained CNI plugin. It runs after the primary
// plugin, hands the pod to the node agent and passes the primary's result
// through unchanged. It never talks to the Kubernetes API.
package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"runtime/debug"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/sidelane/sidelane/agent/cnirpc"
)

// SupportedVersions are the CNI spec versions the plugin speaks.
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// errPluginNotAvailable is CNI code 50: the plugin cannot serve ADD.
const (
	errPluginNotAvailable uint = 50
)

// Plugin holds what the handlers need from the process.
type Plugin struct {
	// Stderr receives logs when the config names no log file.
	Stderr io.Writer
	// BuildVersion is printed in the about text.
	BuildVersion string
}

// Main runs the plugin as a CNI binary.
func Main(buildVersion string) {
	p := &Plugin{Stderr: os.Stderr, BuildVersion: buildVersion}
	// skel reads the config from stdin; keep a copy so an error can carry
	// the config's cniVersion, as the spec's error object asks and skel's
	// own printing omits.
	stdin, rerr := readStdin(os.Stdin)
	if rerr != nil {
		printError(os.Stdout, stdin, rerr)
		os.Exit(1)
	}
	r, w, err := os.Pipe()
	if err == nil {
		go func() { _, _ = w.Write(stdin); w.Close() }()
		os.Stdin = r
	}
	cerr := skel.PluginMainFuncsWithError(skel.CNIFuncs{
		Add:    guard(p.cmdAdd),
		Del:    guard(p.cmdDel),
		Check:  guard(p.cmdCheck),
		GC:     guard(p.cmdGC),
		Status: guard(p.cmdStatus),
	}, version.PluginSupports(supportedVersions...), "sidelane-cni "+buildVersion+": chained CNI plugin for Istio traffic capture")
	if cerr != nil {
		printError(os.Stdout, stdin, cerr)
		os.Exit(1)
	}
}

// MaxStdin bounds the network config the plugin reads from stdin. A
// conflist entry with its prevResult is a few KiB; the bound keeps a broken
// or hostile caller from making the plugin (run for every pod) hold an
// arbitrary amount of memory. It matches cnirpc.MaxMessageSize, the bound
// on what the agent accepts.
const MaxStdin = cnirpc.MaxMessageSize

// readStdin reads the network config, at most MaxStdin bytes; a larger one
// is a CNI error naming the limit (its first MaxStdin bytes are returned,
// for the error's cniVersion).
func readStdin(r io.Reader) ([]byte, *types.Error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxStdin+1))
	if err != nil {
		return data, types.NewError(types.ErrIOFailure, fmt.Sprintf("read network config from stdin: %v", err), "")
	}
	if len(data) > MaxStdin {
		return data[:MaxStdin], types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("network config on stdin is larger than %d bytes", MaxStdin), "")
	}
	return data, nil
}

// printError writes the spec's error object: cniVersion, code, msg, details.
func printError(w io.Writer, stdin []byte, e *types.Error) {
	var conf struct {
		CNIVersion string `json:"cniVersion"`
	}
	_ = json.Unmarshal(stdin, &conf)
	out := struct {
		CNIVersion string `json:"cniVersion,omitempty"`
		*types.Error
	}{conf.CNIVersion, e}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "    ")
	_ = enc.Encode(out)
}

// guard turns a panic into a CNI error, so the runtime gets JSON and a
// message instead of a Go stack on stdout.
func guard(f func(*skel.CmdArgs) error) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = types.NewError(types.ErrInternal, fmt.Sprintf("sidelane-cni internal error: %v", r), string(debug.Stack()))
			}
		}()
		return f(args)
	}
}

func (p *Plugin) setup(args *skel.CmdArgs) (*Config, *slog.Logger, func(), error) {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return nil, nil, nil, types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	w, closeLog := p.Stderr, func() {}
	if conf.LogFile != "" {
		f, err := os.OpenFile(conf.LogFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
		if err == nil {
			w, closeLog = f, func() { f.Close() }
		}
	}
	log := slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: conf.Level()})).With(
		"plugin", "sidelane-cni", "containerID", args.ContainerID, "network", conf.Name)
	return conf, log, closeLog, nil
}

func client(conf *Config) cnirpc.Client {
	return cnirpc.Client{Socket: conf.AgentSocket, Timeout: conf.Timeout()}
}

func (p *Plugin) cmdAdd(args *skel.CmdArgs) error {
	conf, log, done, err := p.setup(args)
	if err != nil {
		return err
	}
	defer done()
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "missing prevResult",
			"sidelane-cni is a chained plugin: list it after the primary CNI plugin in a .conflist")
	}
	kargs, err := ParseArgs(args.Args)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, err.Error(), "")
	}
	result, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("convert prevResult: %v", err), "")
	}
	req := cnirpc.Request{
		Op:         cnirpc.OpAdd,
		Network:    conf.Name,
		Attachment: cnirpc.Attachment{ContainerID: args.ContainerID, IfName: args.IfName},
		Netns:      args.Netns,
		Pod:        podRef(kargs),
		IPs:        resultIPs(result),
	}
	rep, err := client(conf).Do(context.Background(), req)
	if err := agentError(rep, err); err != nil {
		if conf.FailPolicy == FailOpen {
			log.Warn("pod not handed to agent; passing through uncaptured (failPolicy open)", "error", err.Msg)
			return types.PrintResult(conf.PrevResult, conf.CNIVersion)
		}
		return err
	}
	log.Info("pod added", "pod", req.Pod.Namespace+"/"+req.Pod.Name, "mode", rep.Mode)
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

func (p *Plugin) cmdDel(args *skel.CmdArgs) error {
	conf, log, done, err := p.setup(args)
	if err != nil {
		return err
	}
	defer done()
	// DEL is best effort: pod info is optional, the agent may be down, and
	// the netns may be gone. The agent's GC and reconcile clean up later.
	var pod cnirpc.PodRef
	if kargs, err := ParseArgs(args.Args); err == nil {
		pod = podRef(kargs)
	}
	req := cnirpc.Request{
		Op:         cnirpc.OpDel,
		Network:    conf.Name,
		Attachment: cnirpc.Attachment{ContainerID: args.ContainerID, IfName: args.IfName},
		Netns:      args.Netns,
		Pod:        pod,
	}
	rep, err := client(conf).Do(context.Background(), req)
	if err := agentError(rep, err); err != nil {
		log.Warn("agent did not confirm DEL; it will clean up on GC or reconcile", "error", err.Msg)
	}
	return nil
}

func (p *Plugin) cmdCheck(args *skel.CmdArgs) error {
	conf, log, done, err := p.setup(args)
	if err != nil {
		return err
	}
	defer done()
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "missing prevResult",
			"CHECK needs the result of the earlier ADD")
	}
	req := cnirpc.Request{
		Op:         cnirpc.OpCheck,
		Network:    conf.Name,
		Attachment: cnirpc.Attachment{ContainerID: args.ContainerID, IfName: args.IfName},
		Netns:      args.Netns,
	}
	rep, err := client(conf).Do(context.Background(), req)
	if err := agentError(rep, err); err != nil {
		if conf.FailPolicy == FailOpen && err.Code == types.ErrTryAgainLater {
			log.Warn("agent unreachable during CHECK (failPolicy open)", "error", err.Msg)
			return nil
		}
		return err
	}
	return nil
}

func (p *Plugin) cmdGC(args *skel.CmdArgs) error {
	conf, _, done, err := p.setup(args)
	if err != nil {
		return err
	}
	defer done()
	req := cnirpc.Request{Op: cnirpc.OpGC, Network: conf.Name}
	for _, a := range conf.ValidAttachments {
		req.ValidAttachments = append(req.ValidAttachments, cnirpc.Attachment{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	rep, err := client(conf).Do(context.Background(), req)
	if err := agentError(rep, err); err != nil {
		return err
	}
	return nil
}

func (p *Plugin) cmdStatus(args *skel.CmdArgs) error {
	conf, _, done, err := p.setup(args)
	if err != nil {
		return err
	}
	defer done()
	if conf.StatusPolicy == StatusIgnore {
		return nil
	}
	rep, err := client(conf).Do(context.Background(), cnirpc.Request{Op: cnirpc.OpStatus})
	if err != nil {
		return types.NewError(errPluginNotAvailable, err.Error(),
			"pods already running stay captured; new pods cannot be added until the agent is back")
	}
	if !rep.OK {
		return types.NewError(errPluginNotAvailable, "sidelane agent error: "+rep.Error, "")
	}
	if !rep.Ready {
		return types.NewError(errPluginNotAvailable, "sidelane agent not ready: "+rep.Reason, "")
	}
	return nil
}

// agentError maps a failed call or a failed reply to a CNI error. Transient
// failures (agent unreachable or starting) get code 11 so the runtime retries.
func agentError(rep *cnirpc.Reply, err error) *types.Error {
	if err != nil {
		if errors.Is(err, cnirpc.ErrUnreachable) {
			return types.NewError(types.ErrTryAgainLater, err.Error(),
				"is the sidelane agent running on this node? (failPolicy closed refuses pods while it is not)")
		}
		return types.NewError(types.ErrInternal, err.Error(), "")
	}
	if !rep.OK {
		code := types.ErrInternal
		if rep.Retry {
			code = types.ErrTryAgainLater
		}
		return types.NewError(code, "sidelane agent: "+rep.Error, "")
	}
	return nil
}

func podRef(a *K8sArgs) cnirpc.PodRef {
	return cnirpc.PodRef{
		Namespace: string(a.K8S_POD_NAMESPACE),
		Name:      string(a.K8S_POD_NAME),
		UID:       string(a.K8S_POD_UID),
	}
}

func resultIPs(r *current.Result) []netip.Prefix {
	var out []netip.Prefix
	for _, ipc := range r.IPs {
		addr, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			continue
		}
		ones, _ := ipc.Address.Mask.Size()
		out = append(out, netip.PrefixFrom(addr.Unmap(), ones))
	}
	return out
}
