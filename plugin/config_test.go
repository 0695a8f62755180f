package plugin

import (
	"strings"
	"testing"
	"time"
)

func TestParseConfig(t *testing.T) {
	const base = `"cniVersion":"1.0.0","name":"k8s","type":"sidelane-cni"`
	for _, tc := range []struct {
		name, in, wantErr string
		check             func(t *testing.T, c *Config)
	}{
		{name: "defaults", in: `{` + base + `}`, check: func(t *testing.T, c *Config) {
			if c.AgentSocket != DefaultSocket || c.Timeout() != DefaultTimeout || c.FailPolicy != FailClosed || c.StatusPolicy != StatusIgnore {
				t.Errorf("defaults not applied: %+v", c)
			}
		}},
		{name: "all fields", in: `{` + base + `,"agentSocket":"/run/s.sock","agentTimeout":"750ms","failPolicy":"open","statusPolicy":"agent","logLevel":"debug","logFile":"/tmp/x.log"}`,
			check: func(t *testing.T, c *Config) {
				if c.AgentSocket != "/run/s.sock" || c.Timeout() != 750*time.Millisecond || c.FailPolicy != FailOpen || c.StatusPolicy != StatusAgent || c.LogFile != "/tmp/x.log" {
					t.Errorf("fields not parsed: %+v", c)
				}
			}},
		{name: "unknown fields tolerated", in: `{` + base + `,"someFutureField":{"a":1},"capabilities":{"portMappings":true}}`},
		{name: "prevResult parsed", in: `{` + base + `,"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.0.5/24","interface":0}]}}`,
			check: func(t *testing.T, c *Config) {
				if c.PrevResult == nil {
					t.Error("prevResult not parsed")
				}
			}},
		{name: "bad failPolicy", in: `{` + base + `,"failPolicy":"maybe"}`, wantErr: `invalid failPolicy "maybe"`},
		{name: "bad statusPolicy", in: `{` + base + `,"statusPolicy":"x"}`, wantErr: `invalid statusPolicy "x"`},
		{name: "bad timeout", in: `{` + base + `,"agentTimeout":"soon"}`, wantErr: `invalid agentTimeout "soon"`},
		{name: "negative timeout", in: `{` + base + `,"agentTimeout":"-1s"}`, wantErr: `invalid agentTimeout`},
		{name: "huge timeout", in: `{` + base + `,"agentTimeout":"10m"}`, wantErr: `invalid agentTimeout`},
		{name: "relative socket", in: `{` + base + `,"agentSocket":"run/s.sock"}`, wantErr: `invalid agentSocket`},
		{name: "relative log file", in: `{` + base + `,"logFile":"x.log"}`, wantErr: `invalid logFile`},
		{name: "bad log level", in: `{` + base + `,"logLevel":"loud"}`, wantErr: `invalid logLevel "loud"`},
		{name: "no name", in: `{"cniVersion":"1.0.0"}`, wantErr: "name is required"},
		{name: "no version", in: `{"name":"k8s"}`, wantErr: "cniVersion is required"},
		{name: "wrong type", in: `{` + base + `,"failPolicy":3}`, wantErr: "parse network config"},
		{name: "not json", in: `{`, wantErr: "parse network config"},
		{name: "bad prevResult", in: `{` + base + `,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"nope"}]}}`, wantErr: "invalid prevResult"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if tc.check != nil {
				tc.check(t, c)
			}
		})
	}
}

func TestParseArgs(t *testing.T) {
	a, err := ParseArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u;FOO=bar")
	if err != nil {
		t.Fatal(err)
	}
	if r := podRef(a); r.Namespace != "ns" || r.Name != "p" || r.UID != "u" {
		t.Fatalf("pod = %+v", r)
	}
	if _, err := ParseArgs("K8S_POD_NAME=p;FOO=bar"); err == nil || !strings.Contains(err.Error(), "FOO") {
		t.Fatalf("unknown key without IgnoreUnknown: err = %v, want it to name FOO", err)
	}
	if _, err := ParseArgs(""); err != nil {
		t.Fatalf("empty args: %v", err)
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"k8s","type":"sidelane-cni","failPolicy":"open","agentTimeout":"1s"}`))
	f.Add([]byte(`{"cniVersion":"0.3.1","name":"k8s","prevResult":{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.1.0.5/24","interface":0}]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			return
		}
		// Anything accepted is fully defaulted and within bounds.
		if c.FailPolicy != FailClosed && c.FailPolicy != FailOpen {
			t.Fatalf("accepted failPolicy %q", c.FailPolicy)
		}
		if c.StatusPolicy != StatusIgnore && c.StatusPolicy != StatusAgent {
			t.Fatalf("accepted statusPolicy %q", c.StatusPolicy)
		}
		if c.Timeout() <= 0 || c.Timeout() > maxTimeout {
			t.Fatalf("accepted timeout %v", c.Timeout())
		}
		if !strings.HasPrefix(c.AgentSocket, "/") {
			t.Fatalf("accepted socket %q", c.AgentSocket)
		}
	})
}

func FuzzParseArgs(f *testing.F) {
	f.Add("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p")
	f.Add("K8S_POD_UID=abc")
	f.Fuzz(func(t *testing.T, s string) {
		_, _ = ParseArgs(s) // must not panic
	})
}
