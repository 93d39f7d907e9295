package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// Agent is a node's long-running part: it answers the fleet's HTTP-01
// tokens from Redis for whichever node ordered, heartbeats so that
// orderers check their tokens through it, installs what the fleet
// publishes (Sync), and re-seeds an emptied Redis.
//
// It starts without Redis: nginx and HAProxy go on serving what is on
// disk, a deploy a killed agent left half-done is finished from disk,
// and the agent connects when Redis answers, backing off meanwhile.
type Agent struct {
	// Local is this node's state directory.
	Local *store.Store
	// Connect opens this node's fleet. An error that is a
	// *rdb.Unavailable is retried with backoff; any other ends Run.
	Connect func(ctx context.Context) (*Node, error)
	// Sync, when set, installs and deploys what the fleet publishes;
	// its N is set on connect.
	Sync *Syncer
	// Listener serves HTTP-01; the command binds it.
	Listener net.Listener
	// Advertise is where peers reach it (host:port).
	Advertise string
	Version   string
	// Beat is the heartbeat interval (default 3 s); a heartbeat lives
	// for five of them.
	Beat time.Duration

	node    atomic.Pointer[Node] // nil until Connect succeeds
	mu      sync.Mutex
	cache   map[string]cached // host + " " + token
	seeding atomic.Bool       // a rebuild check is running
	removed atomic.Bool       // this node was taken out of the fleet
}

// N is the connected node, or nil before Redis first answered.
func (a *Agent) N() *Node { return a.node.Load() }

type cached struct {
	keyAuth string
	checked time.Time // when Redis last confirmed it
	expires time.Time // the token's own TTL
}

// fresh is how long a cached token is answered without asking Redis.
const fresh = 2 * time.Second

// Run serves until ctx ends; it returns nil on a clean stop.
func (a *Agent) Run(ctx context.Context) error {
	if a.Beat <= 0 {
		a.Beat = 3 * time.Second
	}
	a.cache = map[string]cached{}
	srv := &http.Server{Handler: a, ReadHeaderTimeout: 10 * time.Second, ErrorLog: nil}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(a.Listener) }()
	if a.Sync != nil && a.Local != nil {
		// Before Redis: a deploy this agent was killed in the middle of
		// is owed now, whether or not Redis answers.
		a.Sync.Local = a.Local
		a.Sync.FinishLocal(ctx)
	}
	go func() {
		n, err := a.connect(ctx)
		if err != nil || n == nil {
			errc <- err // nil: ctx ended first
			return
		}
		if err := a.checkAdvertise(ctx, n); err != nil {
			errc <- err
			return
		}
		a.node.Store(n)
		if a.Sync != nil {
			a.Sync.N = n
			go a.Sync.Run(ctx)
		}
		a.heartbeats(ctx)
	}()
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	if n := a.N(); n != nil {
		dctx, dcancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer dcancel()
		n.Shared.DelHeartbeat(dctx, n.Name)
	}
	return err
}

// maxBackoff caps the agent's retries while Redis is away: every retry
// is one connection attempt per node, cheap for Redis, and a fleet
// whose Redis is back should not wait long for its agents (an order
// needs at least one live agent, and waits for the slowest to sync).
const maxBackoff = 10 * time.Second

// connect calls Connect until it succeeds, backing off from 1 s to 10 s
// while Redis is unreachable; it returns a lasting error (this node is
// not a member, Redis holds another fleet) at once.
func (a *Agent) connect(ctx context.Context) (*Node, error) {
	wait := time.Second
	warned := false
	for {
		n, err := a.Connect(ctx)
		if err == nil {
			if warned {
				slog.Info("the fleet's Redis answers; the agent is connected")
			}
			return n, nil
		}
		if !errors.As(err, new(*rdb.Unavailable)) {
			return nil, err
		}
		if !warned {
			slog.Warn("the fleet's Redis is unreachable; nginx and HAProxy keep serving what is on disk, and the agent connects when it answers", "err", err)
			warned = true
		}
		select {
		case <-ctx.Done():
			return nil, nil
		case <-time.After(wait):
		}
		wait = min(wait*2, maxBackoff)
	}
}

func (a *Agent) heartbeats(ctx context.Context) {
	down := false
	wait := a.Beat
	for {
		err := a.beat(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			if !down {
				slog.Warn("the agent's heartbeat failed (the fleet's Redis is unreachable, or this node was removed); serving from disk and the tokens already cached, and retrying", "err", err)
			}
			down = true
			wait = min(wait*2, maxBackoff) // back off while it is away
		case down:
			slog.Info("the fleet's Redis is back")
			down, wait = false, a.Beat
		}
		if err == nil {
			// What a run of this node kept here while Redis was away is
			// published now, not only when the next run starts.
			a.publishQueued(ctx)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// beat says this agent is alive first, so that nothing slow after it
// (rebuilding an emptied Redis from thousands of lineages) can let the
// heartbeat lapse and orderers stop counting on this node.
func (a *Agent) beat(ctx context.Context) error {
	n := a.N()
	bctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	info, _ := json.Marshal(AgentInfo{Node: n.Name, Addr: a.Advertise, Version: a.Version, PID: os.Getpid(), At: time.Now().UTC()})
	if err := n.Shared.Heartbeat(bctx, n.Name, info, 5*a.Beat); err != nil {
		return err
	}
	if !a.removed.Load() && a.seeding.CompareAndSwap(false, true) {
		go func() {
			defer a.seeding.Store(false)
			sctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
			defer cancel()
			if err := n.CheckSeeded(sctx); err != nil && ctx.Err() == nil {
				slog.Warn("could not rebuild the fleet's Redis from this node; trying again", "err", err)
			}
		}()
	}
	// A key rotation (fleet remove) is followed, so the agent can open
	// what is sealed under the new key; membership changes are read. A
	// node that was removed stops answering tokens and installing
	// (invariant I5).
	if err := a.refresh(bctx); err != nil {
		return err
	}
	return n.loadMembers(bctx, false)
}

// refresh follows a key rotation; a node that learns it was removed
// stops answering tokens and installing for good.
func (a *Agent) refresh(ctx context.Context) error {
	err := a.N().Refresh(ctx)
	var removed *Removed
	if errors.As(err, &removed) && a.removed.CompareAndSwap(false, true) {
		slog.Error("this node was removed from the fleet: its agent answers no token and installs nothing more", "err", err)
	}
	return err
}

// publishQueued publishes the certificates a run of this node kept
// here while Redis was away (the run itself is gone, or waits for its
// next start).
func (a *Agent) publishQueued(ctx context.Context) {
	pctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := a.N().PublishSpool(pctx); err != nil && ctx.Err() == nil {
		slog.Warn("could not publish the certificates kept on this node while Redis was away; trying again", "err", err)
	}
}

const challengePath = "/.well-known/acme-challenge/"

// ServeHTTP answers GET /.well-known/acme-challenge/TOKEN for the Host
// the token was published for, and nothing else.
func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead || !strings.HasPrefix(r.URL.Path, challengePath) {
		http.NotFound(w, r)
		return
	}
	token := strings.TrimPrefix(r.URL.Path, challengePath)
	if token == "" || strings.ContainsAny(token, "/.") {
		http.NotFound(w, r)
		return
	}
	host := splitHost(r.Host)
	if a.N() == nil {
		http.Error(w, "not connected to the fleet's Redis yet", http.StatusServiceUnavailable)
		return
	}
	if a.removed.Load() {
		http.NotFound(w, r)
		return
	}
	keyAuth, ok, away := a.lookup(r.Context(), host, token)
	if away {
		// Not "no such token": the orderer's check waits for this, and
		// a 404 would make it give up an order Redis will be back for.
		w.Header().Set(RedisAwayHeader, "1")
		http.Error(w, "the fleet's Redis is not answering", http.StatusServiceUnavailable)
		return
	}
	if !ok {
		http.NotFound(w, r)
		return
	}
	slog.Debug("answered HTTP-01", "host", host, "token", token, "from", r.RemoteAddr, "agent", r.UserAgent())
	w.Header().Set("Content-Type", "text/plain")
	io.Copy(w, bytes.NewReader([]byte(keyAuth)))
}

// lookup finds the key authorization of host's token: from the cache
// while it is fresh, else from Redis. away is Redis not answering (or
// a rotation not followed yet) for a token not cached.
func (a *Agent) lookup(ctx context.Context, host, token string) (keyAuth string, ok, away bool) {
	k := host + " " + token
	now := time.Now()
	a.mu.Lock()
	c, hit := a.cache[k]
	a.mu.Unlock()
	if hit && now.Sub(c.checked) < fresh && now.Before(c.expires) {
		return c.keyAuth, true, false
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	keyAuth, ttl, epoch, err := a.N().Shared.Token(rctx, host, token)
	if err != nil {
		// Redis away: a token seen before is still good until it expires.
		if hit && now.Before(c.expires) {
			return c.keyAuth, true, false
		}
		return "", false, true
	}
	// A rotation since this agent's last heartbeat may be this node's
	// removal: from the moment 'fleet remove' returns its agent answers
	// no token (I5), so the rotation is followed before answering, and
	// a token is not answered while it cannot be.
	if epoch > a.N().Epoch() {
		if err := a.refresh(rctx); err != nil {
			// Removed: no token, for good. Anything else may pass.
			return "", false, !errors.As(err, new(*Removed))
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if keyAuth == "" {
		delete(a.cache, k)
		return "", false, false
	}
	if ttl <= 0 {
		ttl = TokenTTL
	}
	a.cache[k] = cached{keyAuth: keyAuth, checked: now, expires: now.Add(ttl)}
	// Expired entries go on every write: the cache stays the size of
	// the tokens in flight.
	for key, e := range a.cache {
		if now.After(e.expires) {
			delete(a.cache, key)
		}
	}
	return keyAuth, true, false
}

// checkAdvertise refuses an address the other nodes cannot reach: the
// orderer fetches each token through every live agent before the CA
// validates, so an agent that advertises a loopback address in a fleet
// whose other agents are on other hosts would make every orderer check
// itself, and one that advertises another agent's address is never
// checked at all.
func (a *Agent) checkAdvertise(ctx context.Context, n *Node) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	agents, err := n.LiveAgents(cctx)
	if err != nil {
		return nil // Redis away: the heartbeat loop says so
	}
	mine := isLoopback(a.Advertise)
	for _, o := range agents {
		switch {
		case o.Node == n.Name:
		case o.Addr == a.Advertise:
			return fmt.Errorf("node %s's agent already advertises %s: each node's agent needs an address of its own (--advertise-addr)", o.Node, a.Advertise)
		case mine && !isLoopback(o.Addr):
			return fmt.Errorf("this agent advertises %s, a loopback address, but node %s's agent is at %s: the other nodes could not reach this one; give --advertise-addr HOST:PORT with this host's address", a.Advertise, o.Node, o.Addr)
		}
	}
	return nil
}

func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// ErrAdvertise is an agent address peers could not reach.
var ErrAdvertise = errors.New("--http-addr has no host part, so peers cannot reach it: give --advertise-addr HOST:PORT")
