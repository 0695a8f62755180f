//go:build linux

package nftables

import (
	"path/filepath"
	"testing"

	"sigs.k8s.io/knftables"
)

// TestTransactionGolden checks the one nft transaction that installs each
// case's tables (testdata/transaction); -update rewrites.
func TestTransactionGolden(t *testing.T) {
	for _, tc := range ruleCases {
		t.Run(tc.name, func(t *testing.T) {
			s := settings(t, tc.pod)
			tx := knftables.NewFake("", "").NewTransaction()
			Transaction(tx, Tables(s, s.DualStack))
			golden(t, filepath.Join("testdata", "transaction", tc.name+".golden"), tx.String())
		})
	}
}
