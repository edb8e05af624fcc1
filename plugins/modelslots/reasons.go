package modelslots

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// Per-node reasons that do not depend on the node. The framework prefixes
// each with the number of nodes that gave it ("3 node(s) had no model slots").
const (
	ErrReasonNoSlots = "node(s) had no model slots"
	// ErrReasonInvalidNodeSlots is the reason with the default slots label;
	// invalidNodeSlotsReason names the configured one.
	ErrReasonInvalidNodeSlots = "node(s) had an invalid " + NodeSlotsLabel + " label"
)

// invalidNodeSlotsReason is the reason for a node whose slots label is not a
// count, naming the label so that operators fix the one the plugin reads.
func invalidNodeSlotsReason(label string) string {
	return "node(s) had an invalid " + label + " label"
}

// maxCachedReasons bounds the reason cache; past it, reasons are formatted
// each time (correct, only slower).
const maxCachedReasons = 1024

// reasonCache keeps the per-node reasons that carry numbers. Filter rejects
// thousands of nodes per cycle in a full cluster, but only a handful of
// distinct (used, capacity) pairs and models recur, so formatting each once
// keeps Filter free of fmt on its hot path.
type reasonCache struct {
	m sync.Map // reasonKey -> string
	n atomic.Int32
}

type reasonKind uint8

const (
	tooSmall reasonKind = iota
	slotsInUse
	atModelCap
)

type reasonKey struct {
	kind    reasonKind
	a, b, c int64
	model   string
}

func (rc *reasonCache) reason(k reasonKey) string {
	if v, ok := rc.m.Load(k); ok {
		return v.(string)
	}
	var r string
	switch k.kind {
	case tooSmall: // a: the node's slots, b: the pod's
		r = fmt.Sprintf("node(s) had %s, fewer than the %d the pod needs", plural(k.a, "model slot"), k.b)
	case slotsInUse: // a: used, b: capacity, c: the pod's slots (> 1)
		r = fmt.Sprintf("node(s) had %d/%d model slots in use, the pod needs %d", k.a, k.b, k.c)
	case atModelCap: // a: replicas on the node, b: the cap
		r = fmt.Sprintf("node(s) already run %s of %s, max %d per node", plural(k.a, "replica"), k.model, k.b)
	}
	if rc.n.Load() < maxCachedReasons {
		if _, loaded := rc.m.LoadOrStore(k, r); !loaded {
			rc.n.Add(1)
		}
	}
	return r
}

func plural(n int64, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
