package plugin

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/sidelane/sidelane/internal/testenv"
)

// TestStdinLimit runs the built sidelane-cni (make build) with a network
// config larger than MaxStdin: the runtime gets a CNI error naming the
// limit instead of the plugin reading (and holding) whatever it is sent.
func TestStdinLimit(t *testing.T) {
	bin := filepath.Join(testenv.SidelaneBin(t), "sidelane-cni")
	conf := `{"cniVersion":"1.0.0","name":"big","type":"sidelane-cni","padding":"` + strings.Repeat("x", 2<<20) + `"}`
	cmd := exec.Command(bin)
	cmd.Env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=big", "CNI_NETNS=/var/run/netns/none", "CNI_IFNAME=eth0", "CNI_PATH=" + t.TempDir()}
	cmd.Stdin = strings.NewReader(conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err == nil {
		t.Fatalf("ADD with a %d-byte config succeeded: %s", len(conf), stdout.String())
	}
	var ce types.Error
	if jerr := json.Unmarshal(stdout.Bytes(), &ce); jerr != nil {
		t.Fatalf("stdout is not a CNI error: %v\n%s\nstderr: %s", jerr, stdout.String(), stderr.String())
	}
	if ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Msg, "larger than 1048576 bytes") {
		t.Fatalf("error = %+v, want code %d naming the 1048576-byte limit", ce, types.ErrInvalidNetworkConfig)
	}
}
