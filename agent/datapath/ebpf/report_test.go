package ebpf

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/bpf"
)

// nodeCounterPods serves NodeCounters only (pure-logic test of the report).
type nodeCounterPods struct {
	Pods
	c bpf.NodeCounters
}

func (p *nodeCounterPods) NodeCounters() (bpf.NodeCounters, error) { return p.c, nil }

func TestReportNodeProxy(t *testing.T) {
	tests := []struct {
		name     string
		prev, at bpf.NodeCounters
		wantLog  string
	}{
		{"nothing refused", bpf.NodeCounters{Redirected: 1}, bpf.NodeCounters{Redirected: 5}, ""},
		{"proxy down", bpf.NodeCounters{Refused: 1}, bpf.NodeCounters{Refused: 3}, "node proxy down or unreachable"},
		{"not configured", bpf.NodeCounters{}, bpf.NodeCounters{Unconfigured: 1}, "no node proxy configured"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			d := New(&nodeCounterPods{c: tt.at}, slog.New(slog.NewTextHandler(&buf, nil)))
			got, err := d.ReportNodeProxy(tt.prev)
			if err != nil || got != tt.at {
				t.Fatalf("ReportNodeProxy = %+v, %v; want %+v", got, err, tt.at)
			}
			if tt.wantLog == "" && buf.Len() != 0 || tt.wantLog != "" && !strings.Contains(buf.String(), tt.wantLog) {
				t.Errorf("log %q, want %q", buf.String(), tt.wantLog)
			}
		})
	}
}
