package fleet

import (
	"context"
	"encoding/json"

	"github.com/lbcert/lbcert/internal/ca"
)

// BreakerStore keeps the CAs' breakers (package ca) in the fleet's
// Redis, one field per CA in one small hash: the node that finds a CA
// down opens its breaker for every node, and each node's runs pass it
// over without a timeout of their own. A breaker is advice, so a lost
// update costs at most one more try at the CA.
type BreakerStore struct{ N *Node }

var _ ca.Store = BreakerStore{}

const breakerHash = "breakers"

// Load reads every CA's breaker.
func (b BreakerStore) Load(ctx context.Context) (map[string]ca.State, error) {
	m, err := b.N.Shared.HGetAll(ctx, breakerHash)
	if err != nil {
		return nil, err
	}
	out := make(map[string]ca.State, len(m))
	for server, v := range m {
		var st ca.State
		if json.Unmarshal([]byte(v), &st) == nil {
			out[server] = st
		}
	}
	return out, nil
}

// Save writes server's breaker, naming this node as the one that saw
// its last fault; a closed breaker is removed.
func (b BreakerStore) Save(ctx context.Context, server string, st ca.State) error {
	if st == (ca.State{}) {
		return b.N.Shared.HDel(ctx, breakerHash, server)
	}
	if st.By == "" {
		st.By = b.N.Name
	}
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return b.N.Shared.HSet(ctx, breakerHash, server, string(data))
}
