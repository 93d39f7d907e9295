package store

// Local is the node-local half of lbcert's storage seam: what THIS host
// serves. The shared half, which certificates exist and who may order
// them, is package catalog's Catalog. On one host both halves are the
// same state directory; in a fleet the catalog is the fleet's Redis and
// every node has a Local of its own. *Store implements Local.
//
// The contract, which implementations keep and callers rely on:
//
//   - Versions. Stage writes one version of a lineage atomically under
//     the number the catalog gave it: after it returns, LoadVersion and
//     every file of that version are complete and consistent, whatever
//     crash came before; a failed Stage leaves nothing a reader could
//     see. Staging a version that is already here with the same serial
//     does nothing. A version here with the same number and another
//     serial lost a race the catalog has decided (its number now names
//     another certificate, package catalog's invariant I2): Stage
//     replaces it, so that one number names one certificate on this
//     node too.
//   - The live pointer. Activate makes a staged version live atomically
//     (a reader sees the old version or the new one, never a mix);
//     Rollback(name, 0) takes the lineage out of the live set and keeps
//     its archive. Only the live version is ever read by a load balancer.
//   - The journal. Journal says what this node owes and has done for a
//     lineage: the version it must still deploy (Pending, written before
//     Activate, so a kill at any moment leaves either nothing owed or an
//     entry the next run or agent finishes) and the version it last
//     deployed, with a digest of the deploy settings it used (Deployed),
//     so that new settings redeploy what is already here. SetJournal
//     replaces it atomically.
//   - Forget removes a lineage from this node (live pointer first, then
//     archive and journal) and records a tombstone, so that a node never
//     brings a deleted lineage back into a rebuilt catalog.
//     ReadTombstone reads it back: a certificate issued before it is
//     never installed again (a plan made before the delete).
//   - Prune never removes the live version or one named in protect.
//
// Callers hold the state directory's lock (one host) or its short write
// lock (fleet mode, shared with the agent) around anything that writes.
type Local interface {
	LiveVersion(name string) (int, error)
	LoadVersion(name string, version int) (*Lineage, error)
	Stage(l *Lineage, files Files) error
	Activate(name string, version int) error
	Rollback(name string, previous int) error
	Journal(name string) (Journal, error)
	SetJournal(name string, j Journal) error
	// SetJournals is SetJournal of many lineages, sharing the syncs.
	SetJournals(lineages []string, js []Journal) []error
	Prune(name string, keep int, protect ...int) (removed []int, err error)
	Forget(name string, t Tombstone) error
	ReadTombstone(name string) (*Tombstone, error)
	LivePaths(name string) Paths
}

var _ Local = (*Store)(nil)
