package route

import (
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/lora"
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
	if chat == nil || chat.Pool.Len() != 0 || chat.Unavailable() != "LoRA adapter chat is loaded on or declared by more than one model (llama and qwen), so none serves it" {
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

func declaring(s *discovery.Service, value string) *discovery.Service {
	s.Annotations = map[string]string{lora.Annotation: value}
	return s
}

// A model's Services declare adapters: one declared but reported nowhere is
// looked up with an empty pool, marked Declared, saying so; once an
// endpoint reports it, it is served there. An invalid declaration is
// recorded once and declares nothing; a name declared by two models is
// served by neither, and a model's own name stays the model's.
func TestDeclaredAdapters(t *testing.T) {
	var log claimLog
	b := NewBuilder(health.NewRegistry(health.EjectionPolicy{}), Options{Recorder: &log})
	llama := func() *discovery.Service {
		return declaring(svc("llama", "llama", ready("198.18.0.1:8000", "a1"), ready("198.18.0.2:8000", "a2")),
			"- {name: sql, source: /adapters/sql}\n- {name: chat, source: /adapters/chat, replicas: 1}\n- {name: qwen, source: /q}\n")
	}
	b.ServiceChanged(key("llama"), llama())
	b.ServiceChanged(key("qwen"), svc("qwen", "qwen", ready("198.18.1.1:8000", "q1")))
	tab := b.Table()
	var declared []string
	for _, a := range tab.Lookup("llama").Adapters {
		declared = append(declared, a.Name+"@"+a.Service.String())
	}
	if diff := cmp.Diff([]string{"chat@ns/llama", "qwen@ns/llama", "sql@ns/llama"}, declared); diff != "" {
		t.Errorf("llama's declared adapters (-want +got):\n%s", diff)
	}
	sql := tab.Lookup("sql")
	if sql == nil || sql.Base != "llama" || !sql.Declared || sql.Pool.Len() != 0 ||
		sql.Unavailable() != "LoRA adapter sql of model llama is declared, but none of the model's 2 ready endpoints reports it loaded yet" {
		t.Fatalf("sql, declared and loaded nowhere: %+v", sql)
	}
	if m := tab.Lookup("qwen"); m == nil || m.Base != "" {
		t.Errorf("qwen, a model declared as an adapter too, is looked up as %+v", m)
	}
	b.AdaptersChanged("198.18.0.2:8000", []string{"sql"})
	if diff := cmp.Diff([]string{"198.18.0.2:8000=ns/a2"}, poolAddrs(b.Table().Lookup("sql"))); diff != "" {
		t.Errorf("sql once a2 reports it (-want +got):\n%s", diff)
	}
	if !b.Table().Lookup("sql").Declared {
		t.Error("a loaded declared adapter is not marked declared")
	}

	// qwen's Service declares chat too: neither serves it.
	b.ServiceChanged(key("qwen"), declaring(svc("qwen", "qwen", ready("198.18.1.1:8000", "q1")), `[{"name": "chat", "source": "/c"}]`))
	if chat := b.Table().Lookup("chat"); chat == nil || chat.Declared || chat.Pool.Len() != 0 {
		t.Errorf("chat, declared by llama and qwen: %+v", chat)
	}

	// An invalid declaration is recorded once, however often the Service
	// changes otherwise, and declares nothing.
	bad := func(eps ...discovery.Endpoint) *discovery.Service {
		return declaring(svc("llama", "llama", eps...), "- {name: sql, source: /adapters/sql, replica: 2}")
	}
	b.ServiceChanged(key("llama"), bad(ready("198.18.0.1:8000", "a1")))
	b.ServiceChanged(key("llama"), bad(ready("198.18.0.1:8000", "a1"), ready("198.18.0.2:8000", "a2")))
	if len(log) != 1 || !strings.Contains(log[0], `unknown field "replica"`) {
		t.Errorf("recorded %q, want one error naming the unknown field", log)
	}
	if m := b.Table().Lookup("sql"); m == nil || m.Declared {
		t.Errorf("sql, loaded on a2 but no longer validly declared: %+v", m)
	}
	b.AdaptersChanged("198.18.0.2:8000", nil)
	if m := b.Table().Lookup("sql"); m != nil {
		t.Errorf("sql, neither declared nor loaded: %+v", m)
	}
}
