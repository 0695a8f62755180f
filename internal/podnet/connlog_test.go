package podnet

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseConnLog(t *testing.T) {
	out := "[NOTICE] haproxy started\nconn outbound 10.1.0.5 10.2.0.7:8080\nconn inbound 10.1.0.5 10.2.0.7:8080\nconn garbage\n"
	got := ParseConnLog(out)
	want := []Conn{
		{"outbound", netip.MustParseAddr("10.1.0.5"), netip.MustParseAddrPort("10.2.0.7:8080")},
		{"inbound", netip.MustParseAddr("10.1.0.5"), netip.MustParseAddrPort("10.2.0.7:8080")},
	}
	if len(got) != len(want) {
		t.Fatalf("ParseConnLog = %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("line %d: %+v, want %+v", i, got[i], want[i])
		}
	}
}

func TestHAProxyConfigLogsConnections(t *testing.T) {
	cfg := HAProxyConfig(Sidecar{UID: 1337, GID: 1337, OutPort: 15001, InPort: 15006, LogConnections: true})
	for _, want := range []string{"log stdout format raw local0", `log-format "conn %ft %ci %si:%sp"`, "server orig 0.0.0.0"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("config lacks %q:\n%s", want, cfg)
		}
	}
	if strings.Contains(HAProxyConfig(Sidecar{UID: 1337, GID: 1337, OutPort: 15001, InPort: 15006}), "log-format") {
		t.Error("connection log on without LogConnections")
	}
}
