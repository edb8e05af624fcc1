package proxy

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Decoded is what the router needs from a request body.
type Decoded struct {
	// Model is the body's "model".
	Model string
	// Prefix is the start of the prompt as sent (the raw JSON of "prompt",
	// "messages" or "input", whichever comes first in that order), at most
	// the requested length; nil when the body has none or none was asked
	// for.
	Prefix []byte
}

// Decoding errors; each becomes a 400 whose message says what is wrong.
var (
	errEmptyBody      = errors.New("the request body is empty; send a JSON object with a \"model\"")
	errNotObject      = errors.New("the request body must be a JSON object")
	errMissingModel   = errors.New("the request body has no \"model\"")
	errModelNotString = errors.New("\"model\" must be a string")
)

// modelOnly and withPrompt are the two shapes decoded: the fast one for
// balancers that need only the model, and one that also keeps the prompt
// fields for prefix affinity. encoding/json validates the whole body either
// way, so a malformed body is a 400 here and never reaches a model server.
// (encoding/json matches keys case-insensitively, so {"Model": "x"} routes
// to x and the model server, which reads "model" exactly, rejects it; a
// map decode would be exact but costs more per request.)
type modelOnly struct {
	Model *string `json:"model"`
}

type withPrompt struct {
	Model    *string         `json:"model"`
	Prompt   json.RawMessage `json:"prompt"`
	Messages json.RawMessage `json:"messages"`
	Input    json.RawMessage `json:"input"`
}

// Decode reads the model (and, when prefixLen > 0, the prompt prefix) from
// an OpenAI-style JSON body. The body is not modified.
func Decode(body []byte, prefixLen int) (Decoded, error) {
	if len(body) == 0 {
		return Decoded{}, errEmptyBody
	}
	if prefixLen <= 0 {
		var v modelOnly
		if err := unmarshal(body, &v); err != nil {
			return Decoded{}, err
		}
		return model(v.Model)
	}
	var v withPrompt
	if err := unmarshal(body, &v); err != nil {
		return Decoded{}, err
	}
	d, err := model(v.Model)
	if err != nil {
		return d, err
	}
	for _, raw := range []json.RawMessage{v.Prompt, v.Messages, v.Input} {
		if len(raw) > 0 && string(raw) != "null" {
			d.Prefix = raw[:min(len(raw), prefixLen)]
			break
		}
	}
	return d, nil
}

func model(m *string) (Decoded, error) {
	if m == nil {
		return Decoded{}, errMissingModel
	}
	if *m == "" {
		return Decoded{}, errors.New("\"model\" is empty")
	}
	return Decoded{Model: *m}, nil
}

func unmarshal(body []byte, v any) error {
	err := json.Unmarshal(body, v)
	if err == nil {
		return nil
	}
	var typeErr *json.UnmarshalTypeError
	if errors.As(err, &typeErr) {
		if typeErr.Field == "" {
			return errNotObject
		}
		if typeErr.Field == "model" {
			return errModelNotString
		}
		// A prompt field of an unexpected type is the model server's to
		// judge; RawMessage accepts any JSON value, so this cannot happen.
		return fmt.Errorf("field %q: %w", typeErr.Field, err)
	}
	var syntaxErr *json.SyntaxError
	if errors.As(err, &syntaxErr) {
		return fmt.Errorf("the request body is not valid JSON: %v (at byte %d)", syntaxErr, syntaxErr.Offset)
	}
	return fmt.Errorf("the request body is not valid JSON: %v", err)
}
