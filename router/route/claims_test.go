package route

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
)

type claimLog []string

func (l *claimLog) ClaimRefused(model string, c RefusedClaim) {
	*l = append(*l, model+" "+c.Service.String()+" owner="+c.Owner)
}

func (l *claimLog) AdaptersInvalid(svc types.NamespacedName, _ types.UID, err error) {
	*l = append(*l, svc.String()+": "+err.Error())
}

func claim(ns, name, model string, created time.Time, shareWith string, eps ...discovery.Endpoint) *discovery.Service {
	s := &discovery.Service{Key: types.NamespacedName{Namespace: ns, Name: name}, Labels: map[string]string{"capstan.dev/model": model},
		Port: "http", Endpoints: eps, Created: created}
	if shareWith != "" {
		s.Annotations = map[string]string{ShareAnnotation: shareWith}
	}
	return s
}

// A model name belongs to the namespace whose Service claimed it first; other
// namespaces' Services of the name get no traffic unless the owner shares it,
// and every refusal is recorded once.
func TestModelNameBelongsToTheFirstClaim(t *testing.T) {
	var log claimLog
	b := NewBuilder(health.NewRegistry(health.EjectionPolicy{}), Options{Recorder: &log})
	t0 := time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)
	change := func(s *discovery.Service) { b.ServiceChanged(s.Key, s) }
	owner := claim("team-a", "llama", "llama", t0, "", ready("198.18.0.1:8000", "a"))
	thief := claim("team-b", "llama", "llama", t0.Add(time.Hour), "", ready("198.18.0.2:8000", "b"))
	// The later claim arrives first: the order of events must not matter.
	change(thief)
	change(owner)
	change(claim("team-c", "llama", "llama", t0.Add(2*time.Hour), "", ready("198.18.0.3:8000", "c")))
	m := b.Table().Lookup("llama")
	if diff := cmp.Diff([]string{"198.18.0.1:8000=ns/a"}, poolAddrs(m)); diff != "" {
		t.Errorf("pool (-want +got):\n%s", diff)
	}
	if m.Owner != "team-a" || m.Total != 1 {
		t.Errorf("owner %q total %d, want team-a 1", m.Owner, m.Total)
	}
	wantRefused := []RefusedClaim{{Service: types.NamespacedName{Namespace: "team-b", Name: "llama"}, Owner: "team-a"}, {Service: types.NamespacedName{Namespace: "team-c", Name: "llama"}, Owner: "team-a"}}
	if diff := cmp.Diff(wantRefused, m.Refused); diff != "" {
		t.Errorf("refused (-want +got):\n%s", diff)
	}
	// team-b was refused when it lost to team-a; team-c on arrival.
	if diff := cmp.Diff(claimLog{"llama team-b/llama owner=team-a", "llama team-c/llama owner=team-a"}, log); diff != "" {
		t.Errorf("recorded (-want +got):\n%s", diff)
	}

	// An unrelated change of a refused Service is not a new refusal.
	change(claim("team-b", "llama", "llama", t0.Add(time.Hour), "", ready("198.18.0.2:8000", "b"), ready("198.18.0.4:8000", "b2")))
	if len(log) != 2 {
		t.Errorf("a refused Service's update was recorded again: %v", log)
	}

	// The owner shares with team-b (not team-c).
	change(claim("team-a", "llama", "llama", t0, " team-b ,", ready("198.18.0.1:8000", "a")))
	m = b.Table().Lookup("llama")
	if diff := cmp.Diff([]string{"198.18.0.1:8000=ns/a", "198.18.0.2:8000=ns/b", "198.18.0.4:8000=ns/b2"}, poolAddrs(m)); diff != "" {
		t.Errorf("shared pool (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"team-b"}, m.SharedWith); diff != "" || len(m.Refused) != 1 {
		t.Errorf("sharedWith (-want +got):\n%s refused %v", diff, m.Refused)
	}
	// A share annotation on a refused namespace's own Service grants nothing.
	change(claim("team-c", "llama", "llama", t0.Add(2*time.Hour), "team-c", ready("198.18.0.3:8000", "c")))
	if got := b.Table().Lookup("llama").Total; got != 3 {
		t.Errorf("total %d after team-c shared with itself, want 3", got)
	}

	// Withdrawing the grant refuses team-b again, and says so again.
	change(owner)
	if m = b.Table().Lookup("llama"); m.Total != 1 || len(log) != 3 {
		t.Errorf("after the grant was withdrawn: total %d, recorded %v", m.Total, log)
	}

	// The owner's Service goes: the next claim owns the name.
	b.ServiceChanged(owner.Key, nil)
	m = b.Table().Lookup("llama")
	if m.Owner != "team-b" || m.Total != 2 {
		t.Errorf("after the owner left: owner %q total %d, want team-b 2", m.Owner, m.Total)
	}
}

// Equal creation times (a second's resolution) fall back to the namespace and
// name, so every replica picks the same owner.
func TestClaimTieBreak(t *testing.T) {
	b := NewBuilder(health.NewRegistry(health.EjectionPolicy{}), Options{})
	t0 := time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)
	for _, ns := range []string{"zeta", "alpha", "mid"} {
		s := claim(ns, "m", "m", t0, "")
		b.ServiceChanged(s.Key, s)
	}
	if got := b.Table().Lookup("m").Owner; got != "alpha" {
		t.Errorf("owner %q, want alpha", got)
	}
}
