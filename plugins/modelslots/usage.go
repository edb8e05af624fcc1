package modelslots

import (
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"

	"k8s.io/component-helpers/scheduling/corev1"
	fwk "k8s.io/kube-scheduler/framework"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// nodeUsage is how a node's model slots are used, computed from one NodeInfo:
// the pods bound to the node and the pods this scheduler has assumed onto it
// but not yet bound. Because the scheduler's cache adds an assumed pod to its
// NodeInfo before the next scheduling cycle starts, counting from NodeInfo
// makes concurrent binding cycles unable to overfill a node without any
// Reserve bookkeeping of our own. Its counts never change once built.
type nodeUsage struct {
	// generation is the NodeInfo generation this was computed from.
	generation int64
	// capacity is how many slots the node holds (0 with invalidLabel).
	capacity     int64
	invalidLabel bool
	// used is the sum of the slots of the model-server pods on the node. It
	// can exceed capacity when the label was lowered or pods bypassed us.
	used int64
	// replicas counts model-server pods per model; a node runs few models,
	// so a slice beats a map.
	replicas []modelCount
	// minPriority is the lowest priority among the node's model-server pods
	// (MaxInt32 when there are none): preemption can free slots here only
	// for a pod of higher priority.
	minPriority int32
	// inUse is Filter's reason for a full node, formatted on first use: a
	// full node stays full for many cycles and many pods.
	inUse atomic.Pointer[string]
}

type modelCount struct {
	key ModelKey
	n   int64
}

func (u *nodeUsage) free() int64 { return max(0, u.capacity-u.used) }

// inUseReason says how many of the node's slots are in use.
func (u *nodeUsage) inUseReason() string {
	if r := u.inUse.Load(); r != nil {
		return *r
	}
	r := fmt.Sprintf("node(s) had %d/%d model slots in use", u.used, u.capacity)
	u.inUse.Store(&r)
	return r
}

func (u *nodeUsage) replicasOf(k ModelKey) int64 {
	for _, r := range u.replicas {
		if r.key == k {
			return r.n
		}
	}
	return 0
}

// fits reports whether one more replica of d fits on the node.
func (u *nodeUsage) fits(d Demand) bool {
	return u.free() >= d.Slots && (d.MaxPerNode == 0 || u.replicasOf(d.Key) < d.MaxPerNode)
}

func computeUsage(c Capacity, ni fwk.NodeInfo) *nodeUsage {
	u := &nodeUsage{generation: ni.GetGeneration(), minPriority: math.MaxInt32}
	var err error
	if u.capacity, err = c.NodeSlots(ni.Node()); err != nil {
		u.invalidLabel = true
	}
	for _, pi := range ni.GetPods() {
		pod := pi.GetPod()
		model := modelserver.Model(pod.Labels)
		if model == "" {
			continue
		}
		u.used += podSlots(pod)
		u.minPriority = min(u.minPriority, corev1.PodPriority(pod))
		k := ModelKey{Namespace: pod.Namespace, Model: model}
		found := false
		for i := range u.replicas {
			if u.replicas[i].key == k {
				u.replicas[i].n++
				found = true
				break
			}
		}
		if !found {
			u.replicas = append(u.replicas, modelCount{key: k, n: 1})
		}
	}
	return u
}

// usageCache remembers each node's usage by NodeInfo generation. The
// scheduler bumps a NodeInfo's generation on every change to the node or its
// pods (bound or assumed), so an entry with the current generation is exact,
// and PreFilter walks 5,000 nodes comparing generations instead of reading
// every pod on every node in every cycle.
type usageCache struct {
	capacity Capacity
	// byName holds every node's latest usage; a sync.Map, because Filter
	// and Score run on many nodes in parallel.
	byName sync.Map // node name -> *nodeUsage
	// names counts the keys in byName, to know when to sweep.
	names atomic.Int64

	// list mirrors the snapshot's node list as PreFilter last walked it.
	// The scheduler keeps that list, and each node's NodeInfo, from cycle
	// to cycle unless nodes come or go, so the walk finds a node's usage by
	// position, and Filter and Score find it by NodeInfo, without hashing
	// the node's name. Only PreFilter replaces it (under walkMu); readers
	// take whichever list is current.
	walkMu sync.Mutex
	list   atomic.Pointer[nodeList]
}

// nodeList is an immutable node list with a usage slot per node.
type nodeList struct {
	nodes []fwk.NodeInfo
	index map[fwk.NodeInfo]int
	usage []atomic.Pointer[nodeUsage]
}

func newNodeList(nodes []fwk.NodeInfo) *nodeList {
	l := &nodeList{nodes: slices.Clone(nodes), index: make(map[fwk.NodeInfo]int, len(nodes)),
		usage: make([]atomic.Pointer[nodeUsage], len(nodes))}
	for i, ni := range nodes {
		l.index[ni] = i
	}
	return l
}

func newUsageCache(c Capacity) *usageCache {
	return &usageCache{capacity: c}
}

// walk calls visit with the usage of each node in turn, starting at index
// start and wrapping around, until visit returns false. The nodes must be
// the scheduler's snapshot; changed ones are computed and remembered.
func (c *usageCache) walk(nodes []fwk.NodeInfo, start int, visit func(i int, u *nodeUsage) bool) {
	c.walkMu.Lock()
	defer c.walkMu.Unlock()
	l := c.list.Load()
	if l == nil || len(l.nodes) != len(nodes) {
		l = newNodeList(nodes)
		c.list.Store(l)
	}
	for k := range nodes {
		i := (start + k) % len(nodes)
		ni := nodes[i]
		if l.nodes[i] != ni {
			// Nodes came and went: index the new list.
			l = newNodeList(nodes)
			c.list.Store(l)
		}
		u := l.usage[i].Load()
		if u == nil || u.generation != ni.GetGeneration() {
			u = c.byNameOrCompute(ni, nil)
			l.usage[i].Store(u)
		}
		if !visit(i, u) {
			return
		}
	}
}

// get returns a node's usage for Filter and Score: by NodeInfo from the
// walked list when it is current, else as byNameOrCompute does, keeping the
// result in the list for the nodes PreFilter's walk did not reach.
func (c *usageCache) get(ni fwk.NodeInfo, remember func(fwk.NodeInfo) bool) *nodeUsage {
	l := c.list.Load()
	var i int
	inList := false
	if l != nil {
		i, inList = l.index[ni]
		if inList {
			if u := l.usage[i].Load(); u != nil && u.generation == ni.GetGeneration() {
				return u
			}
		}
	}
	u := c.byNameOrCompute(ni, remember)
	if inList {
		// The list holds the snapshot's own NodeInfos, never the copies
		// made for preemption, so this is the node's current usage.
		l.usage[i].Store(u)
	}
	return u
}

// byNameOrCompute returns a node's usage from byName when the node has not
// changed, else computes it. A computed usage is remembered only when
// remember is nil or says ni is the scheduler's snapshot of the node:
// preemption and nominated pods make modified copies with new generations,
// which must not evict the entry for the real node.
func (c *usageCache) byNameOrCompute(ni fwk.NodeInfo, remember func(fwk.NodeInfo) bool) *nodeUsage {
	name := ni.Node().Name
	if v, ok := c.byName.Load(name); ok {
		if u := v.(*nodeUsage); u.generation == ni.GetGeneration() {
			return u
		}
	}
	u := computeUsage(c.capacity, ni)
	if remember == nil || remember(ni) {
		if _, loaded := c.byName.Swap(name, u); !loaded {
			c.names.Add(1)
		}
	}
	return u
}

// sweep forgets nodes that are gone once the cache holds more than twice as
// many entries as the cluster has nodes, so its cost is spread over many
// node deletions. exists reports whether a node is still in the snapshot.
func (c *usageCache) sweep(nodes int, exists func(name string) bool) (removed int) {
	if c.names.Load() <= int64(2*nodes+16) {
		return 0
	}
	c.byName.Range(func(k, _ any) bool {
		if name := k.(string); !exists(name) {
			if _, loaded := c.byName.LoadAndDelete(name); loaded {
				c.names.Add(-1)
				removed++
			}
		}
		return true
	})
	return removed
}
