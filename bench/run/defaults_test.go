package run

import (
	"flag"
	"strings"
	"testing"
)

func TestParseBoolDefault(t *testing.T) {
	for _, def := range []bool{false, true} {
		fs := flag.NewFlagSet("agent", flag.ContinueOnError)
		fs.Bool("enable-shortcut", def, "redirect bytes socket-to-socket\n(sockmap)")
		fs.Bool("enable-shortcut-stats", !def, "a flag whose name starts the same")
		fs.String("datapath", "auto", "backend")
		var b strings.Builder
		fs.SetOutput(&b)
		fs.PrintDefaults()
		got, err := ParseBoolDefault(b.String(), ShortcutFlag)
		if err != nil || got != def {
			t.Errorf("default %v: parsed %v, %v from\n%s", def, got, err, b.String())
		}
		if _, err := ParseBoolDefault(b.String(), "no-such-flag"); err == nil {
			t.Error("a missing flag parsed")
		}
		if _, err := ParseBoolDefault(b.String(), "datapath"); err == nil {
			t.Error("a string flag parsed as bool")
		}
	}
}
