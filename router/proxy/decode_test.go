package proxy

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestDecode(t *testing.T) {
	for name, tc := range map[string]struct {
		body       string
		prefixLen  int
		wantModel  string
		wantPrefix string
		wantErr    error
	}{
		"completion":            {body: `{"model":"llama","prompt":"hi"}`, wantModel: "llama"},
		"model after the rest":  {body: `{"prompt":"hi","max_tokens":4,"model":"llama"}`, wantModel: "llama"},
		"escaped model":         {body: `{"model":"ll\u0061ma"}`, wantModel: "llama"},
		"prompt prefix":         {body: `{"model":"m","prompt":"You are helpful. Q1"}`, prefixLen: 10, wantModel: "m", wantPrefix: `"You are h`},
		"short prompt":          {body: `{"model":"m","prompt":"hi"}`, prefixLen: 10, wantModel: "m", wantPrefix: `"hi"`},
		"chat messages":         {body: `{"model":"m","messages":[{"role":"system","content":"x"}]}`, prefixLen: 12, wantModel: "m", wantPrefix: `[{"role":"sy`},
		"embedding input":       {body: `{"model":"m","input":["a","b"]}`, prefixLen: 100, wantModel: "m", wantPrefix: `["a","b"]`},
		"null prompt, messages": {body: `{"model":"m","prompt":null,"messages":[1]}`, prefixLen: 100, wantModel: "m", wantPrefix: `[1]`},
		"no prompt at all":      {body: `{"model":"m"}`, prefixLen: 100, wantModel: "m"},
		"empty":                 {body: ``, wantErr: errEmptyBody},
		"array":                 {body: `[{"model":"m"}]`, wantErr: errNotObject},
		"string":                {body: `"m"`, wantErr: errNotObject},
		"missing model":         {body: `{"prompt":"x"}`, wantErr: errMissingModel},
		"null model":            {body: `{"model":null}`, wantErr: errMissingModel},
		"numeric model":         {body: `{"model":1}`, wantErr: errModelNotString},
		"numeric model, prefix": {body: `{"model":{"a":1}}`, prefixLen: 5, wantErr: errModelNotString},
	} {
		t.Run(name, func(t *testing.T) {
			d, err := Decode([]byte(tc.body), tc.prefixLen)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d.Model != tc.wantModel || string(d.Prefix) != tc.wantPrefix {
				t.Errorf("got model %q prefix %q, want %q %q", d.Model, d.Prefix, tc.wantModel, tc.wantPrefix)
			}
		})
	}
	for _, bad := range []string{`{"model":"m"`, `{"model":"m"}}`, `{model:"m"}`, "{\"model\":\"m\x00\"}", `{"model":"m",}`} {
		if _, err := Decode([]byte(bad), 0); err == nil || !strings.Contains(err.Error(), "not valid JSON") {
			t.Errorf("Decode(%q): %v, want a not-valid-JSON error", bad, err)
		}
	}
}

// FuzzDecode checks that decoding never panics, accepts exactly the JSON
// objects whose "model" is a non-empty string, returns that string, and
// never returns a prefix longer than asked or one that is not the start of
// the prompt field.
func FuzzDecode(f *testing.F) {
	for _, seed := range []string{
		`{"model":"llama","prompt":"hello"}`,
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}`,
		`{"model":"m","input":"x"}`,
		`{"model":"\ud83d\ude00"}`,
		`{"model":""}`, `{"model":null}`, `{"model":3}`, `[]`, `{}`, `{"model":"a","model":"b"}`,
		`{"Model":"x"}`, "\xff", `{"model":"m","prompt":` + strings.Repeat("[", 100),
	} {
		f.Add([]byte(seed), 8)
	}
	f.Fuzz(func(t *testing.T, body []byte, prefixLen int) {
		prefixLen %= 4096
		d, err := Decode(body, prefixLen)
		if err != nil {
			if d.Model != "" {
				t.Fatalf("error %v with model %q", err, d.Model)
			}
			return
		}
		if !json.Valid(body) {
			t.Fatalf("accepted invalid JSON %q", body)
		}
		var obj map[string]any
		if err := json.Unmarshal(body, &obj); err != nil {
			t.Fatalf("accepted a body that is not a JSON object: %q (%v)", body, err)
		}
		if d.Model == "" {
			t.Fatalf("accepted %q without a model", body)
		}
		// encoding/json matches keys case-insensitively and takes the last
		// duplicate; when the exact key is there, it must be what we got.
		if m, ok := obj["model"].(string); ok && m != d.Model && !hasOtherCase(obj) {
			t.Fatalf("model %q, want %q in %q", d.Model, m, body)
		}
		if !utf8.ValidString(d.Model) {
			t.Fatalf("model %q is not UTF-8", d.Model)
		}
		if prefixLen <= 0 && d.Prefix != nil {
			t.Fatalf("a prefix %q without asking", d.Prefix)
		}
		if len(d.Prefix) > max(prefixLen, 0) {
			t.Fatalf("prefix of %d bytes, asked for %d", len(d.Prefix), prefixLen)
		}
	})
}

func hasOtherCase(obj map[string]any) bool {
	for k := range obj {
		if k != "model" && strings.EqualFold(k, "model") {
			return true
		}
	}
	return false
}
