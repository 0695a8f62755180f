package istiod

import (
	"encoding/json"
	"os"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/sidelane/sidelane/internal/testenv"
)

// TestAgentXDSGoldensValidateDeep runs the deep validation on every
// resource the agent's own node-proxy xDS server sends, as pinned by
// agent/xds's golden files (TestBuildGolden, TestBuildPerNodeGolden keep
// them equal to what xds.Build produces): listeners and clusters, and
// everything inside their Anys.
func TestAgentXDSGoldensValidateDeep(t *testing.T) {
	for _, f := range []string{"resources.golden.json", "pernode.golden.json"} {
		t.Run(f, func(t *testing.T) {
			b, err := os.ReadFile(testenv.RepoRoot(t) + "/agent/xds/testdata/" + f)
			if err != nil {
				t.Fatal(err)
			}
			var docs []json.RawMessage
			if err := json.Unmarshal(b, &docs); err != nil {
				t.Fatal(err)
			}
			var v validation
			listeners := 0
			for i, d := range docs {
				// Listeners first, then clusters; protojson rejects
				// fields the other type lacks.
				var m proto.Message = &listenerv3.Listener{}
				if err := protojson.Unmarshal(d, m); err != nil {
					m = &clusterv3.Cluster{}
					if err := protojson.Unmarshal(d, m); err != nil {
						t.Fatalf("resource %d is neither a listener nor a cluster: %v", i, err)
					}
				} else {
					listeners++
				}
				validateDeep(m, f, &v)
			}
			for _, e := range v.errs {
				t.Errorf("agent xDS resource invalid: %s", e)
			}
			if listeners == 0 || v.checked <= len(docs) {
				t.Errorf("%d listeners, %d messages validated for %d resources: nothing unpacked", listeners, v.checked, len(docs))
			}
			t.Logf("%d resources (%d listeners), %d messages validated, opaque: %q", len(docs), listeners, v.checked, v.opaqueTypes())
		})
	}
}
