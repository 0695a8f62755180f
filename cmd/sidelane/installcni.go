package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"

	"github.com/sidelane/sidelane/cni"
)

func runInstallCNI(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("install-cni", flag.ContinueOnError)
	confDir := fs.String("cni-conf-dir", "/host/etc/cni/net.d", "the host's CNI conf dir, as mounted")
	binDir := fs.String("cni-bin-dir", "/host/opt/cni/bin", "the host's CNI bin dir, as mounted")
	cacheDir := fs.String("cni-cache-dir", "/host/var/lib/cni", "libcni's cache dir, as mounted; uninstall keeps the binary while cached attachments name sidelane-cni (\"\" skips the check)")
	source := fs.String("plugin-binary", "", "the sidelane-cni binary to install (default: sidelane-cni next to this binary)")
	ownConfig := fs.Bool("own-config", false, "write sidelane's own conflist (a copy of the primary's list plus sidelane) instead of editing the primary's file")
	ownName := fs.String("own-config-name", cni.DefaultOwnConfig, "file name of the own conflist; must sort before the primary's")
	// Nothing in sidelane reads this kubeconfig (the agent uses its own
	// in-cluster service account), so it is opt-in: a token on the node's
	// disk that nothing needs is only a way to steal it.
	kubeconfig := fs.String("kubeconfig-file", "", "opt-in: write a kubeconfig with the pod's service-account token here (mode 0600, outside the conf dir), for tools on the node; empty: none")
	tokenDir := fs.String("token-dir", "/var/run/secrets/kubernetes.io/serviceaccount", "service-account dir with token and ca.crt")
	server := fs.String("kube-server", "", "API server URL for the kubeconfig (default: from KUBERNETES_SERVICE_HOST/PORT)")
	var entry cni.Entry
	fs.StringVar(&entry.AgentSocket, "agent-socket", "", "plugin agentSocket (empty: the plugin's default /var/run/sidelane/cni.sock)")
	fs.StringVar(&entry.AgentTimeout, "agent-timeout", "", "plugin agentTimeout (empty: 5s)")
	fs.StringVar(&entry.FailPolicy, "fail-policy", "", "plugin failPolicy: closed or open (empty: closed)")
	fs.StringVar(&entry.StatusPolicy, "status-policy", "", "plugin statusPolicy: ignore or agent (empty: ignore)")
	fs.StringVar(&entry.LogLevel, "plugin-log-level", "", "plugin logLevel (empty: warn)")
	fs.StringVar(&entry.LogFile, "plugin-log-file", "", "plugin logFile, a host path (empty: stderr, which the runtime logs)")
	once := fs.Bool("once", false, "install once and exit instead of watching")
	uninstall := fs.Bool("uninstall", false, "remove sidelane's config entries, the kubeconfig and then the binary, and exit")
	cleanup := fs.Bool("cleanup-on-exit", false, "uninstall when terminated (SIGTERM), e.g. when the DaemonSet is deleted")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("invalid -log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("component", "install-cni")

	if *source == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find plugin binary: %w", err)
		}
		*source = filepath.Join(filepath.Dir(exe), cni.PluginType)
	}
	if *server == "" {
		if host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"); host != "" && port != "" {
			*server = "https://" + net.JoinHostPort(host, port)
		} else if *kubeconfig != "" {
			log.Info("no API server known (not in a pod, no -kube-server): writing no kubeconfig")
			*kubeconfig = ""
		}
	}
	inst, err := cni.New(cni.Config{
		ConfDir:        *confDir,
		BinDir:         *binDir,
		SourceBinary:   *source,
		Options:        cni.Options{Entry: entry, OwnConfig: *ownConfig, OwnConfigName: *ownName},
		KubeconfigPath: *kubeconfig,
		TokenDir:       *tokenDir,
		Server:         *server,
		CNICacheDir:    *cacheDir,
		Log:            log,
	})
	if err != nil {
		return err
	}
	switch {
	case *uninstall:
		return inst.Uninstall()
	case *once:
		p, err := inst.Sync()
		if err == nil {
			log.Info("installed", "primary", p.Primary)
		}
		return err
	}
	return inst.Run(ctx, cni.WatchOptions{CleanupOnExit: *cleanup})
}
