package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/istio/capture"
)

// runExplain asks the local agent why a pod is in its mode.
func runExplain(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("explain", flag.ContinueOnError)
	socket := fs.String("socket", agent.DefaultSocket, "the agent's Unix socket")
	output := fs.String("o", "text", "output format: text or json")
	timeout := fs.Duration("timeout", 10*time.Second, "bound on the call to the agent")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: sidelane explain [flags] <namespace>/<pod>")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("want exactly one <namespace>/<pod>")
	}
	ns, name, ok := strings.Cut(fs.Arg(0), "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return fmt.Errorf("pod %q: want <namespace>/<pod>", fs.Arg(0))
	}
	if *output != "text" && *output != "json" {
		return fmt.Errorf("-o %q: want text or json", *output)
	}
	rep, err := cnirpc.Client{Socket: *socket, Timeout: *timeout}.Do(ctx, cnirpc.Request{
		Op: cnirpc.OpExplain, Pod: cnirpc.PodRef{Namespace: ns, Name: name},
	})
	if err != nil {
		return err
	}
	if !rep.OK {
		return fmt.Errorf("agent: %s", rep.Error)
	}
	if rep.Explain == nil {
		return errors.New("agent sent no explanation (older agent?)")
	}
	if *output == "json" {
		return printJSON(os.Stdout, rep.Explain)
	}
	return printExplanation(os.Stdout, rep.Explain)
}

// printJSON writes ex as indented JSON with every non-printable rune as a
// \u escape: encoding/json already escapes C0 controls, but passes DEL, C1
// controls (U+009B is CSI to some terminals) and format characters (bidi
// overrides) through raw. They can only occur inside strings, where the
// escape means the same.
func printJSON(w io.Writer, ex *cnirpc.Explanation) error {
	data, err := json.MarshalIndent(ex, "", "  ")
	if err != nil {
		return err
	}
	var b strings.Builder
	for _, r := range string(data) {
		switch {
		case r == '\n' || !needsEscape(r) || r == '\\':
			b.WriteRune(r)
		case r > 0xffff:
			r1, r2 := utf16.EncodeRune(r)
			fmt.Fprintf(&b, `\u%04x\u%04x`, r1, r2)
		default:
			fmt.Fprintf(&b, `\u%04x`, r)
		}
	}
	b.WriteByte('\n')
	_, err = io.WriteString(w, b.String())
	return err
}

func printExplanation(w io.Writer, ex *cnirpc.Explanation) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "pod:\t%s/%s\n", printable(ex.Pod.Namespace), printable(ex.Pod.Name))
	fmt.Fprintf(tw, "datapath:\t%s\n", printable(ex.Datapath))
	if len(ex.Attachments) == 0 {
		fmt.Fprintf(tw, "attachments:\tnone on this node (the pod is not here, or its sandbox has not been set up yet)\n")
	}
	for _, a := range ex.Attachments {
		ips := make([]string, 0, len(a.IPs))
		for _, ip := range a.IPs {
			ips = append(ips, ip.String())
		}
		fmt.Fprintf(tw, "attachment:\t%s/%s/%s (netns %s, ips %s, since %s)\n", printable(a.Network), printable(shortID(a.ContainerID)), printable(a.IfName), printable(a.Netns), strings.Join(ips, ","), a.Added.Format(time.RFC3339))
		fmt.Fprintf(tw, "  mode:\t%s\n", printable(a.Mode))
		fmt.Fprintf(tw, "  why:\t%s\n", printable(a.Reason))
		if a.Capture != nil {
			for i, line := range captureLines(a.Capture) {
				label := ""
				if i == 0 {
					label = "  capture:"
				}
				fmt.Fprintf(tw, "%s\t%s\n", label, line)
			}
		} else if a.Mode == agent.ModeSidecar {
			fmt.Fprintf(tw, "  capture:\tIstio defaults (no traffic.sidecar.istio.io annotations parsed)\n")
		} else {
			fmt.Fprintf(tw, "  capture:\tnone\n")
		}
		if len(a.Counters) == 0 {
			fmt.Fprintf(tw, "  counters:\tnone kept by the %s datapath\n", printable(ex.Datapath))
		}
		keys := make([]string, 0, len(a.Counters))
		for k := range a.Counters {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			fmt.Fprintf(tw, "  counter %s:\t%d\n", printable(k), a.Counters[k])
		}
	}
	switch {
	case ex.L7 == nil:
		fmt.Fprintf(tw, "L7 policy:\tnot known to this agent (it compiles policies only with --xds-socket)\n")
	case len(ex.L7.Policies) == 0:
		fmt.Fprintf(tw, "L7 policy:\tnone selects this pod (its ports are not protected)\n")
	default:
		ports := make([]string, len(ex.L7.Ports))
		for i, p := range ex.L7.Ports {
			ports[i] = fmt.Sprint(p)
		}
		fmt.Fprintf(tw, "L7 policy:\t%s on ports %s\n", printable(strings.Join(ex.L7.Policies, ", ")), strings.Join(ports, ","))
	}
	switch {
	case ex.Current != nil:
		agree := ""
		if slices.ContainsFunc(ex.Attachments, func(a cnirpc.ExplainedAttachment) bool { return a.Mode != ex.Current.Mode }) {
			agree = " (differs from the mode in force: a live move is pending or failed, see the pod's events)"
		}
		fmt.Fprintf(tw, "classifier now:\t%s: %s%s\n", printable(ex.Current.Mode), printable(ex.Current.Reason), agree)
	case ex.CurrentError != "":
		fmt.Fprintf(tw, "classifier now:\tno decision: %s\n", printable(ex.CurrentError))
	}
	return tw.Flush()
}

// printable escapes what a terminal would act on. Most strings explain
// prints come from pods and their owners (the reason carries Istio's
// revision from the pod's sidecar.istio.io/status annotation; namespaces,
// interface names and policy names are chosen by users), so an escape
// sequence or a newline in them must be shown, not obeyed. Printable
// runes pass; everything else (control and format characters, invalid
// UTF-8) and the backslash get strconv.Quote's escapes.
func printable(s string) string {
	if !strings.ContainsFunc(s, needsEscape) && utf8.ValidString(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case needsEscape(r):
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		default:
			b.WriteRune(r)
		}
		i += n
	}
	return b.String()
}

func needsEscape(r rune) bool { return r == '\\' || !unicode.IsPrint(r) }

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// captureLines summarizes capture settings for people; -o json has them all.
func captureLines(c *capture.Settings) []string {
	var out []string
	dst := "no outbound"
	switch {
	case c.OutboundAllCIDRs:
		dst = "all destinations"
	case len(c.IncludeOutboundCIDRs) > 0:
		dst = "destinations in " + joinPrefixes(c.IncludeOutboundCIDRs)
	}
	line := fmt.Sprintf("outbound: %s -> :%d", dst, c.OutboundPort)
	if len(c.ExcludeOutboundCIDRs) > 0 {
		line += ", except " + joinPrefixes(c.ExcludeOutboundCIDRs)
	}
	if len(c.ExcludeOutboundPorts) > 0 {
		line += ", except ports " + joinRanges(c.ExcludeOutboundPorts)
	}
	if len(c.IncludeOutboundPorts) > 0 {
		line += ", plus ports " + joinRanges(c.IncludeOutboundPorts)
	}
	out = append(out, line)
	switch {
	case c.InboundAllPorts:
		line = fmt.Sprintf("inbound: all ports -> :%d", c.InboundPort)
	case len(c.IncludeInboundPorts) > 0:
		line = fmt.Sprintf("inbound: ports %s -> :%d", joinRanges(c.IncludeInboundPorts), c.InboundPort)
	default:
		line = "inbound: none"
	}
	// As Istio, exclusions apply only to "*"; an explicit list is taken as
	// written (15008 aside, which is never captured).
	if len(c.ExcludeInboundPorts) > 0 && c.InboundAllPorts {
		line += ", except ports " + joinRanges(c.ExcludeInboundPorts)
	}
	out = append(out, line)
	out = append(out, fmt.Sprintf("proxy uids %v gids %v are never captured", c.ProxyUIDs, c.ProxyGIDs))
	if c.DNSCapture {
		out = append(out, fmt.Sprintf("DNS (port 53) -> :%d", c.DNSPort))
	} else {
		out = append(out, "DNS: not captured")
	}
	if len(c.ExcludeInterfaces) > 0 {
		out = append(out, "interfaces never captured: "+printable(strings.Join(c.ExcludeInterfaces, ",")))
	}
	return out
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func joinRanges(rs []capture.PortRange) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		if r.First == r.Last {
			s[i] = fmt.Sprint(r.First)
		} else {
			s[i] = fmt.Sprintf("%d-%d", r.First, r.Last)
		}
	}
	return strings.Join(s, ",")
}
