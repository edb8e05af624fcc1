package lora

import (
	"strings"
	"testing"
)

func TestParseAnnotation(t *testing.T) {
	got, err := ParseAnnotation("- name: sql\n  source: /adapters/sql\n  replicas: 2\n- {name: chat, source: hf://org/chat}\n")
	if err != nil || len(got) != 2 || got[0].Name != "sql" || got[0].Want(5) != 2 || got[0].Want(1) != 1 || got[1].Source != "hf://org/chat" || got[1].Want(5) != 5 {
		t.Fatalf("ParseAnnotation = %+v, %v", got, err)
	}
	if got, err := ParseAnnotation(`[{"name":"sql","source":"/a"}]`); err != nil || len(got) != 1 {
		t.Errorf("JSON: %+v, %v", got, err)
	}
	for value, want := range map[string]string{
		"- {name: sql, source: /a, replica: 2}":                `unknown field "replica"`,
		"- {name: sql, source: /a}\n- {name: sql, source: /b}": "adapter sql is declared twice",
		"- {name: 'a b', source: /a}":                          "must be 1 to 256 printable characters",
		"- {name: sql}":                                        "adapter sql needs a source",
		"- {name: sql, source: /a, replicas: 0}":               "replicas must be at least 1",
		"name: sql":                                            "cannot unmarshal",
		strings.Repeat("x", 70000):                             "longer than 65536 bytes",
		"[" + strings.Repeat(`{"name":"a","source":"/a"},`, MaxDeclared) + `{"name":"b","source":"/b"}]`: "65 adapters, at most 64",
	} {
		if _, err := ParseAnnotation(value); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseAnnotation(%.40q) = %v, want an error containing %q", value, err, want)
		}
	}
}
