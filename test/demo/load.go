package demo

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// Clients reports how many clients per model are sending right now.
func (d *Demo) Clients() int { return int(d.clients.Load()) }

// RunLoad ramps each model's clients from 0 to Clients over Ramp, holds for
// Hold, then stops them, letting every request in flight finish. Each client
// sends one chat completion after another through the router.
func (d *Demo) RunLoad(ctx context.Context) error {
	pods, err := d.c.Pods(ctx, d.Namespace, modelserver.ModelLabel)
	if err != nil {
		return err
	}
	initial := map[string]bool{}
	for _, p := range pods {
		initial[p.Namespace+"/"+p.Name] = true
	}
	start := time.Now()
	d.Stats.mu.Lock()
	d.Stats.initialPods = initial
	d.Stats.f.LoadStart = start
	d.Stats.mu.Unlock()

	client := &http.Client{
		Transport: &http.Transport{MaxIdleConnsPerHost: 4 * d.Config.Clients * len(d.Models)},
		Timeout:   time.Minute,
	}
	defer client.CloseIdleConnections()
	var stop atomic.Bool
	var wg sync.WaitGroup
	running := 0
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		elapsed := time.Since(start)
		want := d.Config.Clients
		if elapsed < d.Ramp {
			want = 1 + int(float64(d.Config.Clients-1)*elapsed.Seconds()/d.Ramp.Seconds())
		}
		if elapsed >= d.Ramp+d.Hold || ctx.Err() != nil {
			break
		}
		for ; running < want; running++ {
			for _, m := range d.Models {
				wg.Add(1)
				go func() {
					defer wg.Done()
					d.client(client, m.Name, &stop)
				}()
			}
		}
		d.clients.Store(int64(running))
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
	stop.Store(true)
	wg.Wait()
	d.clients.Store(0)
	d.Stats.update(func(f *Figures) { f.LoadEnd = time.Now() })
	return ctx.Err()
}

// client sends requests for one model until stop is set. A request is never
// abandoned half-way: only answers the system gave count.
func (d *Demo) client(c *http.Client, model string, stop *atomic.Bool) {
	for !stop.Load() {
		if _, connected := d.request(c, model); !connected {
			time.Sleep(100 * time.Millisecond) // a client backs off a little
		}
	}
}

// request sends one chat completion through the router and records its
// answer; it returns when the first byte of the answer came, and whether
// the router answered at all.
func (d *Demo) request(c *http.Client, model string) (firstByte time.Time, connected bool) {
	body := fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"Explain autoscaling in one line."}],"max_tokens":16}`, model)
	resp, err := c.Post(d.Router.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
	now := time.Now()
	if err != nil {
		d.Stats.answered("", err.Error(), now)
		return now, false
	}
	data, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	switch {
	case err != nil:
		d.Stats.answered("", "reading the answer: "+err.Error(), now)
	case resp.StatusCode != http.StatusOK:
		d.Stats.answered("", fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(data))), now)
	default:
		d.Stats.answered(resp.Header.Get("X-Capstan-Pod"), "", now)
	}
	return now, true
}

// RunBurst waits until the idle model's HPA has taken it to zero replicas,
// sends it Burst requests at once, which the router holds until a replica
// is Ready, and waits for every answer and for the model to be back at zero.
func (d *Demo) RunBurst(ctx context.Context) error {
	atZero := func(what string) error {
		return d.c.WaitFor(ctx, 3*time.Minute, what, func(ctx context.Context) (bool, error) {
			dep, err := d.c.Client.AppsV1().Deployments(d.Namespace).Get(ctx, d.Idle.App, metav1.GetOptions{})
			return err == nil && dep.Spec.Replicas != nil && *dep.Spec.Replicas == 0 && dep.Status.Replicas == 0, err
		})
	}
	if err := atZero(d.Idle.Name + " to be at zero replicas"); err != nil {
		return err
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: d.Burst}, Timeout: 5 * time.Minute}
	defer client.CloseIdleConnections()
	start := time.Now()
	d.Stats.update(func(f *Figures) { f.BurstStart = start })
	var wg sync.WaitGroup
	for range d.Burst {
		wg.Go(func() {
			at, _ := d.request(client, d.Idle.Name)
			d.Stats.update(func(f *Figures) {
				if f.BurstFirstByte.IsZero() || at.Before(f.BurstFirstByte) {
					f.BurstFirstByte = at
				}
			})
		})
	}
	wg.Wait()
	d.Stats.update(func(f *Figures) { f.BurstEnd = time.Now() })
	if err := atZero(d.Idle.Name + " to be back at zero replicas"); err != nil {
		return err
	}
	d.Stats.update(func(f *Figures) { f.ZeroReturned = time.Now() })
	return nil
}
