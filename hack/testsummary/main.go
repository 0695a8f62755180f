// Command testsummary reads `go test -json` on stdin, prints a readable log
// (failures with their output), and ends with "N passed, N failed" counting
// leaf tests (tests without subtests). It exits 1 if anything failed.
//
//	testsummary [-v] [-progress] [-log FILE]
//
// -v prints every output line as it comes; -progress only each test's
// "=== RUN" and verdict lines (a long run shows where it is, and the
// failures' output still comes at the end); -log writes the plain
// `go test -v` text to FILE as well.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
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

type options struct {
	verbose, progress bool
	log               io.Writer // nil: none
}

func main() {
	var o options
	logFile := ""
	flag.BoolVar(&o.verbose, "v", false, "print every output line")
	flag.BoolVar(&o.progress, "progress", false, "print the RUN and verdict lines as they come")
	flag.StringVar(&logFile, "log", "", "also write the plain text output to this file")
	flag.Parse()
	var f *os.File
	if logFile != "" {
		var err error
		if f, err = os.Create(logFile); err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(2)
		}
		o.log = f
	}
	failed := summarize(os.Stdin, os.Stdout, o)
	if f != nil {
		if err := f.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(2)
		}
	}
	if failed > 0 {
		os.Exit(1) // os.Exit skips defers: the log is closed above
	}
}

// isProgress: a line of `go test -v` that says which test runs or how one ended.
func isProgress(line string) bool {
	t := strings.TrimLeft(line, " ")
	return strings.HasPrefix(line, "=== RUN") || strings.HasPrefix(t, "--- PASS") ||
		strings.HasPrefix(t, "--- FAIL") || strings.HasPrefix(t, "--- SKIP")
}

// summarize prints to w and returns the number of failed leaf tests
// (at least 1 when a package failed outside its tests).
func summarize(r io.Reader, w io.Writer, o options) int {
	output := map[string]*strings.Builder{}
	result := map[string]string{}
	hasChild := map[string]bool{}
	var order []string
	pkgFailed := false

	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		var ev event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			fmt.Fprintln(w, sc.Text()) // build errors and the like
			if o.log != nil {
				fmt.Fprintln(o.log, sc.Text())
			}
			continue
		}
		if ev.Action == "output" && o.log != nil {
			fmt.Fprint(o.log, ev.Output)
		}
		if ev.Test == "" {
			if ev.Action == "fail" {
				pkgFailed = true
			}
			if ev.Action == "output" && (o.verbose || strings.HasPrefix(ev.Output, "FAIL") || strings.Contains(ev.Output, "panic")) {
				fmt.Fprint(w, ev.Output)
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
			if o.verbose || (o.progress && isProgress(ev.Output)) {
				fmt.Fprint(w, ev.Output)
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
			fmt.Fprintf(w, "--- SKIP %s\n", strings.SplitN(k, " ", 2)[1])
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
		fmt.Fprintf(w, "--- FAIL %s\n", k)
		if !o.verbose && !hasChild[k] {
			fmt.Fprint(w, output[k].String())
		}
	}
	if pkgFailed && failed == 0 {
		failed++ // a package failed outside any test (build error, TestMain)
		fmt.Fprintln(w, "--- FAIL a package failed outside its tests")
	}
	fmt.Fprintf(w, "%d passed, %d failed, %d skipped\n", passed, failed, skipped)
	return failed
}
