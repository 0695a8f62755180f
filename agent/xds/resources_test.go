package xds

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/sidelane/sidelane/policy/compile"
)

var update = flag.Bool("update", false, "rewrite golden files")

// TestBuildGolden pins the per-node Envoy resources (inbound listener with
// original_dst, per-destination chains with RBAC, passthrough, cluster) and
// the grpc-go server listener for the same policy.
func TestBuildGolden(t *testing.T) {
	testBuildGolden(t, "testdata/resources.golden.json", Config{InboundPort: 15006, GRPCServers: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:8080")}})
}

// TestBuildPerNodeGolden pins the node proxy's shape in per-node mode: the
// outbound listener on the node proxy address, one inbound listener inside
// each per-node pod's netns holding only that pod's protected chains, and
// the original-destination cluster bound to the node proxy address.
func TestBuildPerNodeGolden(t *testing.T) {
	testBuildGolden(t, "testdata/pernode.golden.json", Config{
		InboundPort: 15006,
		InPod: []InPodListener{
			{Pod: "shop/api-0", Netns: "/var/run/netns/cni-api-0", IPs: []netip.Addr{serverIP}},
			{Pod: "shop/web-0", Netns: "/var/run/netns/cni-web-0", IPs: []netip.Addr{webIP}},
		},
		Outbound:       netip.MustParseAddrPort("10.244.1.1:15001"),
		UpstreamSource: netip.MustParseAddr("10.244.1.1"),
	})
}

func testBuildGolden(t *testing.T, golden string, cfg Config) {
	res, err := compile.Compile(policies(t, 8080, policyV1), inventory(), compile.Options{Identity: compile.IdentitySourceIP, TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := Build(Destinations(res), cfg)
	if err != nil {
		t.Fatal(err)
	}
	var docs []json.RawMessage
	for _, typ := range []string{resource.ListenerType, resource.ClusterType} {
		for _, r := range rs[typ] {
			b, err := protojson.MarshalOptions{}.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			if err := json.Compact(&buf, b); err != nil {
				t.Fatal(err)
			}
			docs = append(docs, buf.Bytes())
		}
	}
	var out bytes.Buffer
	enc := json.NewEncoder(&out)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(docs); err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), want) {
		t.Errorf("%s differs (run with -update after checking):\n%s", golden, out.Bytes())
	}
}

// TestSetVersions: equal content keeps its version (no push), new content
// gets a new, higher-numbered version.
func TestSetVersions(t *testing.T) {
	ctx := context.Background()
	s, err := NewServer(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	build := func(port uint32) string {
		rs, err := Build(nil, Config{InboundPort: port})
		if err != nil {
			t.Fatal(err)
		}
		v, err := s.Set(ctx, "n", rs)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	v1, v1again, v2 := build(15006), build(15006), build(15007)
	if v1 != v1again {
		t.Errorf("same content, new version: %s then %s", v1, v1again)
	}
	if v2 == v1 || v2[:2] != "2-" {
		t.Errorf("new content: version %s after %s, want 2-<hash>", v2, v1)
	}
	if build(15006) == v1 {
		t.Error("going back to old content reused the old version: proxies holding it would not be updated")
	}
}

// TestPublishLocal: only destinations on this node reach its snapshot, and
// publishing the same state again keeps the version.
func TestPublishLocal(t *testing.T) {
	ctx := context.Background()
	s, err := NewServer(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	ps := policies(t, 8080, policyV1)
	inv := inventory()
	inv.Pods = append(inv.Pods, compile.Pod{Namespace: "shop", Name: "api-remote", Labels: map[string]string{"app": "api"}, IPs: []netip.Addr{netip.MustParseAddr("10.1.0.5")}})
	local := func(a netip.Addr) bool { return a.IsLoopback() }
	v1, res, err := s.Publish(ctx, "n", ps, inv, local, Config{InboundPort: 15006})
	if err != nil {
		t.Fatal(err)
	}
	if g, ok := res.ForPod("shop", "api-remote"); !ok || len(g.Pods) != 2 {
		t.Fatalf("remote pod not compiled: %v", g)
	}
	if len(Destinations(res)) != 2 {
		t.Fatalf("want 2 destinations before filtering, got %d", len(Destinations(res)))
	}
	snap, err := s.cache.GetSnapshot("n")
	if err != nil {
		t.Fatal(err)
	}
	l := snap.GetResources(resource.ListenerType)[InboundListener].(*listenerv3.Listener)
	if len(l.FilterChains) != 2 || l.FilterChains[0].Name != BlackHoleChain || l.FilterChains[1].Name != "127.0.0.1:8080" {
		t.Errorf("chains %v, want only the local pod's", l.FilterChains)
	}
	if v2, _, _ := s.Publish(ctx, "n", ps, inv, local, Config{InboundPort: 15006}); v2 != v1 {
		t.Errorf("same state, new version %s after %s", v2, v1)
	}
}
