// Package layoutv2 is a test-only build of bpf/capture.c with a changed map
// layout (the pods map holds 32,768 pods), for the map-layout migration
// test: bpf.Load of this object over maps pinned by the committed one must
// migrate them. Only tests import it.
package layoutv2

//go:generate go run ./mkv2 ../../capture.c capture_v2.c
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel capturev2 capture_v2.c
