package xdsbench

import (
	"context"
	"testing"
	"time"
)

// TestMeasure checks the measurement runs end to end (no timing assertion).
func TestMeasure(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := Measure(ctx, 5)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Samples) != 5 || r.Max < r.P50 {
		t.Fatalf("bad result %+v", r)
	}
	t.Log(r)
}

// BenchmarkPolicyToAck reports p50/p99 of policy change -> grpc-go ACK.
func BenchmarkPolicyToAck(b *testing.B) {
	r, err := Measure(context.Background(), max(b.N, 20))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(r.P50.Microseconds()), "p50-us")
	b.ReportMetric(float64(r.P99.Microseconds()), "p99-us")
	b.Log(r)
}
