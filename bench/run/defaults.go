package run

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// ShortcutFlag is the agent flag whose shipped default decides what
// sidelane-ebpf (the headline contender) is.
const ShortcutFlag = "enable-shortcut"

// AgentBoolDefault asks the agent binary (`sidelane agent -h`) for the
// default of one of its bool flags, so the benchmark's headline
// configuration is whatever the agent ships, never a copy that can drift.
func AgentBoolDefault(ctx context.Context, sidelane, flag string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// -h exits non-zero after printing the flags: judge by the output.
	out, _ := exec.CommandContext(ctx, sidelane, "agent", "-h").CombinedOutput()
	v, err := ParseBoolDefault(string(out), flag)
	if err != nil {
		return false, fmt.Errorf("%s agent -h: %w", sidelane, err)
	}
	return v, nil
}

// ParseBoolDefault reads a bool flag's default from Go flag usage text:
// "  -name\n    \tusage (default true)"; the flag package prints no default
// for false.
func ParseBoolDefault(usage, flag string) (bool, error) {
	lines := strings.Split(usage, "\n")
	for i, l := range lines {
		head := strings.Fields(l)
		if len(head) == 0 || (head[0] != "-"+flag && head[0] != "--"+flag) || !strings.HasPrefix(l, "  -") {
			continue
		}
		if len(head) > 1 {
			return false, fmt.Errorf("flag -%s is not a bool flag (%q)", flag, strings.TrimSpace(l))
		}
		var text strings.Builder
		for _, d := range lines[i+1:] {
			if !strings.HasPrefix(d, "    ") {
				break
			}
			text.WriteString(d)
		}
		return strings.Contains(text.String(), "(default true)"), nil
	}
	return false, fmt.Errorf("no flag -%s in the usage text", flag)
}
