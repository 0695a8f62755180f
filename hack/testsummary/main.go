// Command testsummary reads `go test -json` on stdin, prints a readable log
// (failures with their output), and ends with "N passed, N failed" counting
// leaf tests (tests without subtests). It exits 1 if anything failed.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
)

type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

func main() {
	verbose := len(os.Args) > 1 && os.Args[1] == "-v"
	output := map[string]*strings.Builder{}
	result := map[string]string{}
	hasChild := map[string]bool{}
	var order []string
	pkgFailed := false

	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		var ev event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			fmt.Println(sc.Text()) // build errors and the like
			continue
		}
		if ev.Test == "" {
			if ev.Action == "fail" {
				pkgFailed = true
			}
			if ev.Action == "output" && (verbose || strings.HasPrefix(ev.Output, "FAIL") || strings.Contains(ev.Output, "panic")) {
				fmt.Print(ev.Output)
			}
			continue
		}
		key := ev.Package + " " + ev.Test
		switch ev.Action {
		case "run":
			order = append(order, key)
			output[key] = &strings.Builder{}
			if i := strings.LastIndex(ev.Test, "/"); i > 0 {
				hasChild[ev.Package+" "+ev.Test[:i]] = true
			}
		case "output":
			if b := output[key]; b != nil {
				b.WriteString(ev.Output)
			}
			if verbose {
				fmt.Print(ev.Output)
			}
		case "pass", "fail", "skip":
			result[key] = ev.Action
		}
	}

	passed, failed, skipped := 0, 0, 0
	var failures []string
	for _, k := range order {
		switch result[k] {
		case "fail":
			if !hasChild[k] {
				failed++
			}
			failures = append(failures, k)
		case "skip":
			if !hasChild[k] {
				skipped++
			}
			fmt.Printf("--- SKIP %s\n", strings.SplitN(k, " ", 2)[1])
		case "pass":
			if !hasChild[k] {
				passed++
			}
		default: // never finished: the binary died or timed out
			if !hasChild[k] {
				failed++
				failures = append(failures, k)
			}
		}
	}
	sort.Strings(failures)
	for _, k := range failures {
		fmt.Printf("--- FAIL %s\n", k)
		if !verbose && !hasChild[k] {
			fmt.Print(output[k].String())
		}
	}
	if pkgFailed && failed == 0 {
		failed++ // a package failed outside any test (build error, TestMain)
		fmt.Println("--- FAIL a package failed outside its tests")
	}
	fmt.Printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped)
	if failed > 0 {
		os.Exit(1)
	}
}
