// Package buildinfo carries the release version stamped at link time.
package buildinfo

// Version is set with -ldflags "-X github.com/sidelane/sidelane/internal/buildinfo.Version=...".
var Version = "dev"
