// Command sidelane-cni is sidelane's chained CNI plugin.
package main

import (
	"github.com/sidelane/sidelane/internal/buildinfo"
	"github.com/sidelane/sidelane/plugin"
)

func main() { plugin.Main(buildinfo.Version) }
