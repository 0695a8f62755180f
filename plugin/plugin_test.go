package plugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

func TestGuardTurnsPanicIntoCNIError(t *testing.T) {
	err := guard(func(*skel.CmdArgs) error { panic("boom") })(&skel.CmdArgs{})
	var ce *types.Error
	if !errors.As(err, &ce) || ce.Code != types.ErrInternal || !strings.Contains(ce.Msg, "boom") {
		t.Fatalf("err = %v", err)
	}
}

func TestPrintErrorCarriesConfigVersion(t *testing.T) {
	var buf bytes.Buffer
	printError(&buf, []byte(`{"cniVersion":"0.4.0","name":"x"}`), types.NewError(7, "bad", "why"))
	var got map[string]any
	if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got["cniVersion"] != "0.4.0" || got["code"] != float64(7) || got["msg"] != "bad" || got["details"] != "why" {
		t.Fatalf("error object = %v", got)
	}
}
