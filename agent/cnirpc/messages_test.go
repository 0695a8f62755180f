package cnirpc

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDecodeRequest(t *testing.T) {
	for _, tc := range []struct {
		name, in, wantErr string
	}{
		{"add", `{"version":1,"op":"add","network":"n","containerID":"c","ifname":"eth0","netns":"/var/run/netns/x","ips":["10.0.0.2/24","fd00::2/64"]}`, ""},
		{"status", `{"version":1,"op":"status"}`, ""},
		{"gc", `{"version":1,"op":"gc","network":"n","validAttachments":[{"containerID":"a","ifname":"eth0"}]}`, ""},
		{"other version", `{"version":2,"op":"status"}`, "unsupported protocol version 2"},
		{"unknown field", `{"version":1,"op":"status","extra":1}`, `unknown field "extra"`},
		{"unknown op", `{"version":1,"op":"frob"}`, `unknown op "frob"`},
		{"no op", `{"version":1}`, "op is required"},
		{"add without netns", `{"version":1,"op":"add","network":"n","containerID":"c","ifname":"eth0"}`, "netns is required"},
		{"del without container", `{"version":1,"op":"del","network":"n","ifname":"eth0"}`, "containerID is required"},
		{"bad ip", `{"version":1,"op":"add","network":"n","containerID":"c","ifname":"eth0","netns":"/x","ips":["10.0.0.300/24"]}`, "ParsePrefix"},
		{"gc attachment without id", `{"version":1,"op":"gc","network":"n","validAttachments":[{"ifname":"eth0"}]}`, "validAttachments[0].containerID"},
		{"trailing", `{"version":1,"op":"status"} {}`, "trailing data"},
		{"not json", `hello`, "decode request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeRequest(strings.NewReader(tc.in))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error = %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestDecodeRequestTooLarge(t *testing.T) {
	big := `{"version":1,"op":"status","network":"` + strings.Repeat("a", MaxMessageSize) + `"}`
	if _, err := DecodeRequest(strings.NewReader(big)); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("error = %v, want size limit", err)
	}
}

func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"version":1,"op":"add","network":"n","containerID":"c","ifname":"eth0","netns":"/x","ips":["10.0.0.2/24"]}`))
	f.Add([]byte(`{"version":1,"op":"gc","network":"n","validAttachments":[{"containerID":"a","ifname":"eth0"}]}`))
	f.Add([]byte(`{"version":1,"op":"status"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := DecodeRequest(strings.NewReader(string(data)))
		if err != nil {
			return
		}
		// Whatever decodes must be valid and carry the version we speak.
		if req.Version != Version {
			t.Fatalf("accepted version %d", req.Version)
		}
		if err := req.Validate(); err != nil {
			t.Fatalf("decoded request fails validation: %v", err)
		}
	})
}

type handlerFunc func(ctx context.Context, req *Request) (*Reply, error)

func (f handlerFunc) Handle(ctx context.Context, req *Request) (*Reply, error) { return f(ctx, req) }

func TestClientServer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "a.sock")
	srv := &Server{Socket: sock, Log: slog.New(slog.DiscardHandler), Handler: handlerFunc(func(_ context.Context, req *Request) (*Reply, error) {
		switch req.ContainerID {
		case "retry":
			return nil, errors.Join(errors.New("not yet"), ErrRetry)
		case "panic":
			panic("boom")
		}
		return &Reply{Mode: "sidecar"}, nil
	})}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode = %v (err %v), want 0600", fi.Mode().Perm(), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	c := Client{Socket: sock, Timeout: 2 * time.Second}
	req := func(id string) Request {
		return Request{Op: OpAdd, Network: "n", Attachment: Attachment{ContainerID: id, IfName: "eth0"}, Netns: "/x"}
	}
	rep, err := c.Do(ctx, req("ok"))
	if err != nil || !rep.OK || rep.Mode != "sidecar" {
		t.Fatalf("ok: rep=%+v err=%v", rep, err)
	}
	rep, err = c.Do(ctx, req("retry"))
	if err != nil || rep.OK || !rep.Retry || !strings.Contains(rep.Error, "not yet") {
		t.Fatalf("retry: rep=%+v err=%v", rep, err)
	}
	rep, err = c.Do(ctx, req("panic"))
	if err != nil || rep.OK || !strings.Contains(rep.Error, "boom") {
		t.Fatalf("panic: rep=%+v err=%v", rep, err)
	}
	rep, err = c.Do(ctx, Request{Op: OpAdd})
	if err != nil || rep.OK || !strings.Contains(rep.Error, "containerID is required") {
		t.Fatalf("invalid: rep=%+v err=%v", rep, err)
	}

	down := Client{Socket: filepath.Join(t.TempDir(), "none.sock"), Timeout: time.Second}
	if _, err := down.Do(ctx, req("x")); !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "none.sock") {
		t.Fatalf("down: err=%v, want ErrUnreachable naming the socket", err)
	}
}
