package lora

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
	"unicode"
)

// maxErrorBytes bounds what is kept of an engine's answer to a failed load,
// for an Event and a log line.
const maxErrorBytes = 256

// Client speaks vLLM's LoRA API to engines: the model list that says which
// adapters are loaded, and the run-time load and unload calls (which vLLM
// serves with VLLM_ALLOW_RUNTIME_LORA_UPDATING set).
type Client struct {
	http      *http.Client
	userAgent string
}

// NewClient returns a Client whose calls each take at most timeout, keeping
// an idle connection per engine for idle; transport, when set, replaces the
// default one (tests).
func NewClient(timeout, idle time.Duration, transport http.RoundTripper, userAgent string) *Client {
	if transport == nil {
		transport = &http.Transport{
			DialContext:            (&net.Dialer{Timeout: timeout}).DialContext,
			MaxIdleConnsPerHost:    1,
			IdleConnTimeout:        idle,
			MaxResponseHeaderBytes: 64 << 10,
			DisableCompression:     true,
			ResponseHeaderTimeout:  timeout,
		}
	}
	return &Client{http: &http.Client{Transport: transport, Timeout: timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}, userAgent: userAgent}
}

// Adapters returns the adapters addr lists, sorted. An engine that has no
// model list (404) has no adapters.
func (c *Client) Adapters(ctx context.Context, addr string) ([]string, error) {
	resp, err := c.do(ctx, http.MethodGet, addr, "/v1/models", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, nil
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("GET /v1/models answered %s", resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxBodyBytes+1))
	if err != nil {
		return nil, err
	}
	if len(body) > MaxBodyBytes {
		return nil, fmt.Errorf("GET /v1/models answered more than %d bytes", MaxBodyBytes)
	}
	return Parse(body)
}

// Load asks addr to load adapter name from source. Success only means the
// engine said so: the model list is the truth of what is loaded.
func (c *Client) Load(ctx context.Context, addr, name, source string) error {
	return c.call(ctx, addr, "/v1/load_lora_adapter", map[string]string{"lora_name": name, "lora_path": source})
}

// Unload asks addr to unload adapter name.
func (c *Client) Unload(ctx context.Context, addr, name string) error {
	return c.call(ctx, addr, "/v1/unload_lora_adapter", map[string]string{"lora_name": name})
}

func (c *Client) call(ctx context.Context, addr, path string, body map[string]string) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	resp, err := c.do(ctx, http.MethodPost, addr, path, b)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBytes))
	return fmt.Errorf("POST %s answered %s: %s", path, resp.Status, printable(msg))
}

func (c *Client) do(ctx context.Context, method, addr, path string, body []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.userAgent != "" {
		req.Header.Set("User-Agent", c.userAgent)
	}
	return c.http.Do(req)
}

// printable keeps what of an engine's message a person can read on one line.
func printable(b []byte) string {
	return strings.TrimSpace(strings.Map(func(r rune) rune {
		if r == unicode.ReplacementChar || !unicode.IsPrint(r) {
			return ' '
		}
		return r
	}, string(b)))
}
