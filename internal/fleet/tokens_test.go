package fleet

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// cutProxy forwards TCP connections to a Redis and can be cut (its
// listener closed and every forwarded connection dropped) and mended
// (listening again on the same address): one node losing Redis while
// the others keep it.
type cutProxy struct {
	addr, target string
	mu           sync.Mutex
	ln           net.Listener
	conns        []net.Conn
}

func startCutProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{addr: ln.Addr().String(), target: target}
	p.serve(ln)
	t.Cleanup(p.cut)
	return p
}

func (p *cutProxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go func() { io.Copy(up, c); up.Close() }()
			go func() { io.Copy(c, up); c.Close() }()
		}
	}()
}

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *cutProxy) mend(t *testing.T) {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		t.Errorf("listen again on %s: %v", p.addr, err)
		return
	}
	p.serve(ln)
}

// An order placed just before Redis went away (e2e
// TestFleetRedisKilledMidBatch, in full test runs): the orderer
// published the token, then an agent could not read it. The agent says
// 503, not 404, and the orderer waits for it, publishing the token
// again, instead of giving up an order the CA already has (which the
// next run orders a second time).
func TestPresentWaitsForAnAgentThatLostRedis(t *testing.T) {
	r, sh := startRedis(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	n1, err := Init(ctx, sh, store.New(filepath.Join(dir, "lb1")), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	// The agent reaches Redis through a proxy that the test cuts.
	proxy := startCutProxy(t, strings.TrimPrefix(strings.TrimSuffix(r.URL(), "/0"), "redis://"))
	shAgent, err := rdb.Dial(ctx, rdb.Options{URL: "redis://" + proxy.addr + "/0", Password: "pw-for-tests"})
	if err != nil {
		t.Fatal(err)
	}
	defer shAgent.Close()
	agentNode, err := Open(ctx, shAgent, store.New(filepath.Join(dir, "lb1")))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &Agent{Connect: func(context.Context) (*Node, error) { return agentNode, nil }, Listener: ln, Advertise: ln.Addr().String()}
	go a.Run(ctx)
	waitFor(t, func() bool { ag, _ := n1.LiveAgents(ctx); return len(ag) == 1 })

	get := func(token string) int {
		req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/.well-known/acme-challenge/"+token, nil)
		req.Host = "foo.com"
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	// A heartbeat lives 5 beats (15 s): the agent stays live through
	// the cut, so what Present meets is its 503, not an empty fleet. The
	// cut outlasts a check's own retries (4 tries of up to 3 s).
	proxy.cut()
	if code := get("unknown"); code != http.StatusServiceUnavailable {
		t.Errorf("a token the agent cannot look up with Redis away: HTTP %d, want 503", code)
	}

	const cutFor = 12 * time.Second
	mended := make(chan struct{})
	go func() {
		defer close(mended)
		time.Sleep(cutFor)
		proxy.mend(t)
	}()
	start := time.Now()
	err = (&Tokens{N: n1}).Present("foo.com", "tok1", "tok1.thumb")
	took := time.Since(start)
	<-mended
	if err != nil {
		t.Fatalf("Present while the agent's Redis was away for %v: %v", cutFor, err)
	}
	if took < cutFor {
		t.Errorf("Present returned after %v, before the agent could answer", took)
	}
	if code := get("tok1"); code != http.StatusOK {
		t.Errorf("the token after Present: HTTP %d", code)
	}

	// A token that is really not there is still a quick 404 and an
	// abandoned authorization, named as such.
	err = (&Tokens{N: n1}).Present("foo.com", "", "x")
	var ace *AgentCheckError
	if !errors.As(err, &ace) || errors.Is(ace.Err, errAgentRedisAway) {
		t.Errorf("an empty token: %v, want an agent check error that is not Redis away", err)
	}
}
