// Package exposition parses a Prometheus metrics page as an inference engine
// serves it: the text format (0.0.4) or OpenMetrics 1.0, after the HTTP
// client has undone any gzip. Parsing is expfmt's; OpenMetrics is first
// reduced to what expfmt's text parser reads (see Parser.Parse), since expfmt
// has no OpenMetrics parser.
package exposition

import (
	"bytes"
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"mime"
	"strconv"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Accept is the Accept header a scraper sends: the text format first, since
// it is what expfmt parses natively and what every supported engine can
// serve; OpenMetrics is accepted from servers that only speak it.
const Accept = "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"

// Format is a page's exposition format.
type Format string

const (
	// Text is the Prometheus text format, version 0.0.4.
	Text Format = "text"
	// OpenMetrics is OpenMetrics 1.0 text.
	OpenMetrics Format = "openmetrics"
)

// FormatOf returns the format a Content-Type names. An empty Content-Type is
// taken as the text format, which is what servers that send none mean.
func FormatOf(contentType string) (Format, error) {
	if contentType == "" {
		return Text, nil
	}
	mediaType, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return "", fmt.Errorf("unreadable Content-Type %q: %w", contentType, err)
	}
	switch mediaType {
	case "text/plain":
		return Text, nil
	case "application/openmetrics-text":
		if v := params["version"]; v != "" && v != expfmt.OpenMetricsVersion_1_0_0 && v != expfmt.OpenMetricsVersion_0_0_1 {
			return "", fmt.Errorf("unsupported OpenMetrics version %q", v)
		}
		return OpenMetrics, nil
	}
	return "", fmt.Errorf("unsupported Content-Type %q: not a Prometheus text or OpenMetrics page", mediaType)
}

// Parser parses pages. It keeps buffers between calls, so a goroutine that
// parses many pages should keep one; it is not safe for concurrent use. The
// zero value is ready to use, without limits.
type Parser struct {
	// Limits bound what a page may hold; they are checked before a line
	// is handed to expfmt, so a page over a limit costs no more memory
	// than the lines up to it.
	Limits Limits

	buf    bytes.Buffer
	text   *expfmt.TextParser // reused: each one allocates a read buffer
	count  counter
	newest newest
}

// Limits bound the series of a page. Zero means no limit.
type Limits struct {
	// MaxSeriesPerFamily caps the series of one family: the samples of a
	// gauge, counter or untyped family, the label sets (le aside) of a
	// histogram, (quantile aside) of a summary.
	MaxSeriesPerFamily int
	// MaxBucketsPerHistogram caps the buckets of one histogram series
	// (the quantiles of one summary series).
	MaxBucketsPerHistogram int
}

// ErrTooManySeries and ErrTooManyBuckets are wrapped by the errors of pages
// over a limit.
var (
	ErrTooManySeries  = errors.New("too many series in a family")
	ErrTooManyBuckets = errors.New("too many buckets in a histogram")
)

// keepBytes is the largest buffer a Parser keeps after a page: one grown
// for an unusually large page is dropped, so that it does not stay pinned
// for as long as the parser lives. Engines' pages are tens of KiB.
const keepBytes = 256 << 10

// Filter says which lines of a page are parsed. Everything else is skipped
// before parsing, which is most of the work: an engine's page has dozens of
// families a consumer does not read.
type Filter struct {
	// Samples are the sample names to keep (vllm:num_requests_waiting,
	// vllm:prompt_tokens_total, tgi_request_input_length_sum).
	Samples map[string]bool
	// Histograms are histogram families to keep whole: their TYPE line and
	// their _bucket, _sum and _count samples.
	Histograms map[string]bool
	// Newest are the samples of which only the line with the largest
	// finite value is kept (the first of equals): an info series whose
	// labels carry the data and whose value is when they were current,
	// such as vllm:lora_requests_info, of which vLLM keeps a series for
	// every state it ever reported. However many lines such a sample has,
	// it costs one line of memory and counts as one series against
	// Limits. A line whose value does not parse is kept, for expfmt to
	// refuse the page.
	Newest map[string]bool
}

// Parse parses a page in the given format into metric families keyed by
// family name, as expfmt's TextParser returns them. With a filter, only the
// lines it keeps are parsed: samples it names (parsed as untyped unless they
// belong to a histogram it keeps) and whole histograms; HELP lines are
// dropped. A nil filter keeps everything.
//
// An OpenMetrics page is reduced to the text format first: everything after a
// sample's value (its timestamp, in seconds rather than the text format's
// milliseconds, and any exemplar) is dropped, TYPE lines of the types the text
// format lacks (info, stateset, unknown) are dropped so their samples parse as
// untyped, and nothing after "# EOF" is read. Counter samples keep their
// _total names and _created samples become families of their own, exactly as
// a text page from the same engine would have them.
//
// With Limits, a page holding more series or buckets than they allow is an
// error wrapping ErrTooManySeries or ErrTooManyBuckets, found while the page
// is read line by line, before expfmt builds anything of it.
func (p *Parser) Parse(format Format, page []byte, filter *Filter) (map[string]*dto.MetricFamily, error) {
	if len(page) > keepBytes {
		defer p.shrink()
	}
	limited := p.Limits != Limits{}
	if format == OpenMetrics || filter != nil || limited {
		var count *counter
		if limited {
			count = &p.count
			count.reset(p.Limits)
		}
		p.buf.Reset()
		err := reduce(page, format == OpenMetrics, filter, count, &p.newest, &p.buf)
		p.newest.reset() // its lines are the caller's page
		if err != nil {
			return nil, err
		}
		page = p.buf.Bytes()
	}
	if p.text == nil {
		tp := expfmt.NewTextParser(model.UTF8Validation)
		p.text = &tp
	}
	families, err := p.text.TextToMetricFamilies(bytes.NewReader(page))
	if err != nil {
		return nil, err
	}
	return families, nil
}

// shrink drops what grew with a large page: the reduced copy, expfmt's
// token buffers, the counters' maps.
func (p *Parser) shrink() {
	if p.buf.Cap() > keepBytes {
		p.buf = bytes.Buffer{}
	}
	p.text = nil
	p.count.drop()
}

var (
	eofLine     = []byte("# EOF")
	typePrefix  = []byte("# TYPE ")
	textMissing = [][]byte{[]byte("info"), []byte("stateset"), []byte("unknown")}
	suffixes    = [][]byte{[]byte("_bucket"), []byte("_sum"), []byte("_count")}
)

// reduce copies the lines of page that the text parser should see to out:
// for OpenMetrics, reduced to the text format; with a filter, only the lines
// it keeps, the newest line of each of its Newest samples last.
// With a counter, every line kept is counted against its limits first.
func reduce(page []byte, openMetrics bool, filter *Filter, count *counter, newest *newest, out *bytes.Buffer) error {
	if filter == nil {
		// Most of the page is kept; with a filter, little is.
		out.Grow(len(page))
	}
	sawEOF := false
	for len(page) > 0 {
		line := page
		if i := bytes.IndexByte(page, '\n'); i >= 0 {
			line, page = page[:i], page[i+1:]
		} else {
			page = nil
		}
		switch {
		case openMetrics && bytes.Equal(line, eofLine):
			sawEOF = true
			page = nil
			continue
		case bytes.HasPrefix(line, typePrefix):
			fields := bytes.Fields(line[len(typePrefix):])
			if openMetrics && len(fields) == 2 && containsBytes(textMissing, fields[1]) {
				continue
			}
			if filter != nil && (len(fields) == 0 || !filter.Histograms[string(fields[0])]) {
				continue
			}
			if count != nil && len(fields) == 2 {
				count.declare(fields[0], fields[1])
			}
		case len(line) > 0 && line[0] == '#':
			if filter != nil {
				continue // HELP, UNIT and plain comments
			}
		case len(line) > 0:
			name := sampleName(line)
			if filter != nil && filter.Newest[string(name)] && newest.offer(name, line) {
				continue
			}
			if filter != nil && !filter.keeps(name) {
				continue
			}
			if count != nil {
				if err := count.sample(name, line[len(name):]); err != nil {
					return err
				}
			}
			if openMetrics {
				line = line[:sampleEnd(line)]
			}
		}
		out.Write(line)
		out.WriteByte('\n')
	}
	if openMetrics && !sawEOF {
		// A page cut short (a timeout mid-body, a proxy) must not pass for
		// a complete one.
		return fmt.Errorf("OpenMetrics page does not end with %q", eofLine)
	}
	// Without a TYPE line (a filter drops those of all but histograms),
	// expfmt takes a family's samples wherever they are on the page.
	for _, n := range newest.lines {
		if count != nil {
			if err := count.sample(n.name, n.line[len(n.name):]); err != nil {
				return err
			}
		}
		line := n.line
		if openMetrics {
			line = line[:sampleEnd(line)]
		}
		out.Write(line)
		out.WriteByte('\n')
	}
	return nil
}

// newest holds the newest line of each Newest sample of a page, as reduce
// reads it: slices of the page, so it must be reset before the page goes.
type newest struct {
	lines []newestLine
}

type newestLine struct {
	name, line []byte
	value      float64
}

// offer considers a line of a Newest sample, and reports whether it was
// taken care of: kept as the newest so far, or passed over for one at least
// as new or for a value that is not finite. A line whose value does not
// parse is not.
func (n *newest) offer(name, line []byte) bool {
	v, ok := sampleValue(line)
	if !ok {
		return false
	}
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return true
	}
	for i := range n.lines {
		if bytes.Equal(n.lines[i].name, name) {
			if v > n.lines[i].value {
				n.lines[i].line, n.lines[i].value = line, v
			}
			return true
		}
	}
	// As many entries as the filter has Newest names, at most.
	n.lines = append(n.lines, newestLine{name: name, line: line, value: v})
	return true
}

func (n *newest) reset() {
	clear(n.lines)
	n.lines = n.lines[:0]
}

// keeps reports whether the filter keeps a sample of this name. The map
// lookups with string(name) do not allocate.
func (f *Filter) keeps(name []byte) bool {
	if f.Samples[string(name)] || f.Newest[string(name)] {
		return true
	}
	for _, suffix := range suffixes {
		if base, ok := bytes.CutSuffix(name, suffix); ok && f.Histograms[string(base)] {
			return true
		}
	}
	return false
}

// sampleName returns the metric name a sample line starts with (up to its
// label set or value). A name quoted inside the braces (UTF-8 names) is not
// recognized, and so never kept by a filter.
func sampleName(line []byte) []byte {
	if i := bytes.IndexAny(line, "{ \t"); i >= 0 {
		return line[:i]
	}
	return line
}

func containsBytes(list [][]byte, b []byte) bool {
	for _, x := range list {
		if bytes.Equal(x, b) {
			return true
		}
	}
	return false
}

// sampleValue parses the value of a sample line as expfmt does, which
// refuses hexadecimal floats and underscores that strconv would take.
func sampleValue(line []byte) (float64, bool) {
	end := sampleEnd(line)
	start := bytes.LastIndexAny(line[:end], " \t") + 1
	token := line[start:end]
	if start == 0 || len(token) == 0 || bytes.ContainsAny(token, "pP_") {
		return 0, false
	}
	v, err := strconv.ParseFloat(string(token), 64)
	return v, err == nil
}

// sampleEnd returns where a sample line's value ends: after the metric name,
// the label set (whose quoted values may hold spaces, braces and #) and the
// value token.
func sampleEnd(line []byte) int {
	i, braces, quoted := 0, false, false
	for ; i < len(line); i++ {
		c := line[i]
		switch {
		case quoted && c == '\\':
			i++
		case quoted:
			quoted = c != '"'
		case c == '"':
			quoted = true
		case c == '{':
			braces = true
		case c == '}':
			braces = false
		case c == ' ' && !braces:
			for i < len(line) && line[i] == ' ' {
				i++
			}
			for i < len(line) && line[i] != ' ' {
				i++
			}
			return i
		}
	}
	return len(line)
}

// counter counts a page's series as reduce keeps its lines, the way expfmt
// will group them: every sample of a gauge, counter or untyped family is a
// series of its own (expfmt merges none), while the samples of a histogram
// (or summary) declared by a TYPE line are grouped by their labels other
// than le (quantile). Its maps are kept from page to page.
type counter struct {
	limits Limits
	// families counts the series of each family, by name.
	families map[string]*int
	// grouped holds the families whose samples are grouped into series,
	// with the label that tells a series' buckets apart ("" for none).
	// Values are pointers, and zeroed rather than deleted between pages,
	// so that counting a name seen on the last page allocates nothing
	// (m[string(b)] allocates when assigning, not when looking up).
	grouped map[string]*string
	// lines counts the buckets of each grouped series, by a hash of its
	// family and labels.
	lines map[uint64]int
	seed  maphash.Seed
	hash  maphash.Hash
}

// keepEntries is the most entries of a map a counter keeps after a page;
// a filter's families are a few dozen.
const keepEntries = 1024

func (c *counter) reset(l Limits) {
	c.limits = l
	if c.families == nil || len(c.families) > keepEntries {
		c.families = map[string]*int{}
	} else {
		for _, n := range c.families {
			*n = 0
		}
	}
	if c.grouped == nil || len(c.grouped) > keepEntries {
		c.grouped = map[string]*string{}
	} else {
		for _, by := range c.grouped {
			*by = ""
		}
	}
	if c.lines == nil || len(c.lines) > keepEntries {
		c.lines = map[uint64]int{}
		c.seed = maphash.MakeSeed()
		c.hash.SetSeed(c.seed)
	} else {
		clear(c.lines)
	}
}

func (c *counter) drop() { c.families, c.grouped, c.lines = nil, nil, nil }

// declare notes a TYPE line.
func (c *counter) declare(name, typ []byte) {
	var by string
	switch string(typ) {
	case "histogram", "gaugehistogram":
		by = "le"
	case "summary":
		by = "quantile"
	default:
		return
	}
	p := c.grouped[string(name)]
	if p == nil {
		p = new(string)
		c.grouped[string(name)] = p
	}
	*p = by
}

// groupedBy returns the label that tells the buckets of a grouped family
// apart, or "".
func (c *counter) groupedBy(family []byte) string {
	if p := c.grouped[string(family)]; p != nil {
		return *p
	}
	return ""
}

// sample counts a sample line: its name, and the rest of the line.
func (c *counter) sample(name, rest []byte) error {
	family, by := name, ""
	if by = c.groupedBy(name); by == "" {
		for _, suffix := range suffixes {
			if base, ok := bytes.CutSuffix(name, suffix); ok {
				if by = c.groupedBy(base); by != "" {
					family = base
					break
				}
			}
		}
	}
	if by == "" {
		return c.series(name)
	}
	c.hash.Reset()
	c.hash.Write(family)
	c.hash.WriteByte(0)
	hashLabels(&c.hash, rest, by)
	h := c.hash.Sum64()
	n, seen := c.lines[h]
	if !seen {
		if err := c.series(family); err != nil {
			return err
		}
	}
	// expfmt appends a bucket (quantile) for each such line, and keeps
	// the last of a series' _sum and _count lines.
	if len(name) == len(family) || bytes.HasSuffix(name, suffixes[0]) {
		n++
		if m := c.limits.MaxBucketsPerHistogram; m > 0 && n > m {
			return fmt.Errorf("%w: a series of %s has more than %d buckets", ErrTooManyBuckets, family, m)
		}
	}
	c.lines[h] = n
	return nil
}

// series counts a new series of a family.
func (c *counter) series(family []byte) error {
	n := c.families[string(family)]
	if n == nil {
		n = new(int)
		c.families[string(family)] = n
	}
	if m := c.limits.MaxSeriesPerFamily; m > 0 && *n >= m {
		return fmt.Errorf("%w: %s has more than %d series", ErrTooManySeries, family, m)
	}
	*n++
	return nil
}

// hashLabels hashes a sample's label set, what follows its name, without
// the label skip and the value. A label set it cannot read is hashed whole:
// expfmt rejects it anyway.
func hashLabels(h *maphash.Hash, rest []byte, skip string) {
	rest = bytes.TrimLeft(rest, " \t")
	if len(rest) == 0 || rest[0] != '{' {
		return
	}
	rest = rest[1:]
	for len(rest) > 0 {
		rest = bytes.TrimLeft(rest, " \t,")
		if len(rest) == 0 || rest[0] == '}' {
			return
		}
		eq := bytes.IndexByte(rest, '=')
		if eq < 0 {
			h.Write(rest)
			return
		}
		name := bytes.TrimSpace(rest[:eq])
		v := bytes.TrimLeft(rest[eq+1:], " \t")
		if len(v) == 0 || v[0] != '"' {
			h.Write(rest)
			return
		}
		end := 1
		for end < len(v) && v[end] != '"' {
			if v[end] == '\\' {
				end++
			}
			end++
		}
		if end >= len(v) {
			h.Write(rest)
			return
		}
		if string(name) != skip {
			h.Write(name)
			h.WriteByte('=')
			h.Write(v[:end+1])
			h.WriteByte(',')
		}
		rest = v[end+1:]
	}
}
