package route

import (
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
)

// An adapter is served from exactly the Ready endpoints of its base model
// that report it, sharing their hosts and the model's in-flight limit, and
// follows both the reports and the model's endpoints; an adapter reported
// under two models is served by neither, and a model's own name is never
// an adapter's.
func TestAdaptersFollowReportsAndEndpoints(t *testing.T) {
	b := NewBuilder(health.NewRegistry(health.EjectionPolicy{}), Options{MaxPerModel: 3})
	b.ServiceChanged(key("llama"), svc("llama", "llama",
		ready("198.18.0.1:8000", "a1"), ready("198.18.0.2:8000", "a2"), ready("198.18.0.3:8000", "a3")))
	b.ServiceChanged(key("qwen"), svc("qwen", "qwen", ready("198.18.1.1:8000", "q1")))
	if diff := cmp.Diff([]string{"198.18.0.1:8000", "198.18.0.2:8000", "198.18.0.3:8000", "198.18.1.1:8000"}, b.Table().Addresses()); diff != "" {
		t.Errorf("addresses to ask (-want +got):\n%s", diff)
	}

	b.AdaptersChanged("198.18.0.1:8000", []string{"sql", "chat"})
	b.AdaptersChanged("198.18.0.3:8000", []string{"sql", "qwen"})
	b.AdaptersChanged("198.18.1.1:8000", []string{"chat"})
	tab := b.Table()
	sql := tab.Lookup("sql")
	if sql == nil || sql.Base != "llama" {
		t.Fatalf("adapter sql: %+v", sql)
	}
	if diff := cmp.Diff([]string{"198.18.0.1:8000=ns/a1", "198.18.0.3:8000=ns/a3"}, poolAddrs(sql)); diff != "" {
		t.Errorf("sql's pool (-want +got):\n%s", diff)
	}
	llama := tab.Lookup("llama")
	if sql.Pool.Endpoints()[0].Host != llama.Pool.Endpoints()[0].Host {
		t.Error("the adapter's endpoint does not share the model's host state")
	}
	if sql.Pool.MaxInFlight() != 3 || !llama.Pool.Admit() || !llama.Pool.Admit() || !sql.Pool.Admit() || sql.Pool.Admit() {
		t.Error("the adapter does not share the model's in-flight limit")
	}
	if m := tab.Lookup("qwen"); m == nil || m.Base != "" {
		t.Errorf("qwen, a model, is looked up as %+v", m)
	}
	chat := tab.Lookup("chat")
	if chat == nil || chat.Pool.Len() != 0 || chat.Unavailable() != "LoRA adapter chat is loaded on endpoints of models llama and qwen, so neither serves it" {
		t.Errorf("chat, reported under llama and qwen, is %+v", chat)
	}
	var names []string
	for _, a := range tab.Adapters() {
		names = append(names, a.Name)
	}
	if !slices.Equal(names, []string{"chat", "sql"}) {
		t.Errorf("adapters %v", names)
	}

	// a3 stops being Ready: sql is left with a1; a1 unloads it: gone.
	b.ServiceChanged(key("llama"), svc("llama", "llama",
		ready("198.18.0.1:8000", "a1"), ready("198.18.0.2:8000", "a2"), discovery.Endpoint{Address: "198.18.0.3:8000", Pod: key("a3")}))
	if diff := cmp.Diff([]string{"198.18.0.1:8000=ns/a1"}, poolAddrs(b.Table().Lookup("sql"))); diff != "" {
		t.Errorf("sql's pool with a3 not Ready (-want +got):\n%s", diff)
	}
	b.AdaptersChanged("198.18.0.1:8000", []string{"chat"})
	if m := b.Table().Lookup("sql"); m != nil {
		t.Errorf("sql, loaded only on a not Ready endpoint, is served: %+v", m)
	}
	b.AdaptersChanged("198.18.1.1:8000", nil)
	if m := b.Table().Lookup("chat"); m == nil || m.Base != "llama" || m.Pool.Len() != 1 {
		t.Errorf("chat, now reported under llama only: %+v", m)
	}
}
