package controller

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/sidelane/sidelane/policy/envoyfilter"
)

// TestRunAgainAfterLosingLeadership: a replica that loses the Lease and
// wins it back reconciles from live caches. Informers cannot be restarted,
// so caches started under the first term's context would be dead in the
// second (the agent's old --policy-writer did that).
func TestRunAgainAfterLosingLeadership(t *testing.T) {
	e := newEnv(t)
	e.pod("api-0", "api")
	e.pod("web-0", "web")
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	c, err := New(log, e.kube, e.dyn, "cluster.local", prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	procCtx, stopProc := context.WithCancel(e.ctx)
	defer stopProc()
	c.Start(procCtx)
	term := func() (stop func()) {
		ctx, cancel := context.WithCancel(procCtx)
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		return func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("run: %v", err)
			}
		}
	}
	exists := func(name string) func() string {
		return func() string {
			if _, err := e.filters().Get(e.ctx, name, metav1.GetOptions{}); err != nil {
				return err.Error()
			}
			return ""
		}
	}
	stop := term()
	e.apply("api", "api", "    - port: 8080\n")
	e.eventually("first term writes", exists(envoyfilter.Name([]string{"api"})))
	stop()

	stop = term()
	defer stop()
	e.apply("web", "web", "    - port: 8080\n")
	e.eventually("second term sees a policy created after the first ended", exists(envoyfilter.Name([]string{"web"})))
}

// TestLeaderKill: two controller processes; the leader is killed (SIGKILL,
// Lease not released) in the middle of an update of many policies. The
// other replica takes over, the EnvoyFilters converge to the policies, and
// a watch opened before anything was written shows each EnvoyFilter went
// through exactly the contents v1, v2: never back, never a third, never
// two writers alternating.
func TestLeaderKill(t *testing.T) {
	e := newEnv(t)
	const n = 12
	for i := range n {
		e.pod(fmt.Sprintf("app%d-0", i), fmt.Sprintf("app%d", i))
	}
	w, err := e.filters().Watch(e.ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	var mu sync.Mutex
	history := map[string][]string{} // EnvoyFilter name -> spec hashes, one per event
	watchDone := make(chan struct{})
	firstV2 := make(chan struct{}) // closed at the first gen-two write
	var v2Once sync.Once
	go func() {
		defer close(watchDone)
		for ev := range w.ResultChan() {
			u, ok := ev.Object.(*unstructured.Unstructured)
			if !ok || (ev.Type != watch.Added && ev.Type != watch.Modified) {
				continue
			}
			b, _ := json.Marshal(u.Object["spec"])
			if strings.Contains(string(b), "/gen-two") {
				v2Once.Do(func() { close(firstV2) })
			}
			mu.Lock()
			history[u.GetName()] = append(history[u.GetName()], fmt.Sprintf("%x", sha256.Sum256(b))[:12])
			mu.Unlock()
		}
	}()

	procs := map[string]*controllerProc{}
	for _, id := range []string{"replica-a", "replica-b"} {
		procs[id] = e.startController(id, fastLease...)
	}
	rules := func(v string) string {
		return "    - port: 8080\n      rules: [{http: [{path: /" + v + "}]}]\n"
	}
	names := make([]string, n)
	for i := range n {
		names[i] = fmt.Sprintf("p%d", i)
		e.apply(names[i], fmt.Sprintf("app%d", i), rules("gen-one"))
	}
	// at counts the EnvoyFilters whose RBAC has the path of version v.
	at := func(v string) (int, string) {
		count, behind := 0, ""
		for i := range n {
			ef, err := e.filters().Get(e.ctx, envoyfilter.Name([]string{names[i]}), metav1.GetOptions{})
			if err != nil {
				behind = err.Error()
				continue
			}
			b, _ := json.Marshal(ef.Object["spec"])
			if strings.Contains(string(b), "/"+v) {
				count++
			} else {
				behind = ef.GetName() + " not at " + v + " yet"
			}
		}
		return count, behind
	}
	converged := func(v string) func() string {
		return func() string { _, behind := at(v); return behind }
	}
	e.eventually("v1 written", converged("gen-one"))
	leader := e.leaseHolder()
	if procs[leader] == nil {
		t.Fatalf("lease holder %q is not a replica", leader)
	}

	// Update half, kill the leader while it writes them, update the rest.
	for i := range n / 2 {
		e.apply(names[i], fmt.Sprintf("app%d", i), rules("gen-two"))
	}
	// Kill as soon as the watch sees the leader's first gen-two write.
	select {
	case <-firstV2:
	case <-time.After(90 * time.Second):
		t.Fatal("the leader wrote no gen-two EnvoyFilter")
	}
	procs[leader].kill()
	done, _ := at("gen-two")
	t.Logf("killed leader %s with %d of %d EnvoyFilters at gen-two", leader, done, n)
	for i := n / 2; i < n; i++ {
		e.apply(names[i], fmt.Sprintf("app%d", i), rules("gen-two"))
	}
	e.eventually("v2 written by the new leader", converged("gen-two"))
	if h := e.leaseHolder(); h == leader || procs[h] == nil {
		t.Errorf("lease holder after the kill: %q (killed: %q)", h, leader)
	}

	w.Stop()
	<-watchDone
	mu.Lock()
	defer mu.Unlock()
	for i := range n {
		name := envoyfilter.Name([]string{names[i]})
		h := history[name]
		if len(h) != 2 || h[0] == h[1] {
			t.Errorf("%s: contents written %v, want exactly v1 then v2", name, h)
		}
		ef, err := e.filters().Get(e.ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if g := ef.GetGeneration(); g != 2 {
			t.Errorf("%s: generation %d, want 2 (one create, one update)", name, g)
		}
	}
}
