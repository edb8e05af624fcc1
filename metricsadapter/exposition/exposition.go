// Package exposition parses a Prometheus metrics page as an inference engine
// serves it: the text format (0.0.4) or OpenMetrics 1.0, after the HTTP
// client has undone any gzip. Parsing is expfmt's; OpenMetrics is first
// reduced to what expfmt's text parser reads (see Parser.Parse), since expfmt
// has no OpenMetrics parser.
package exposition

import (
	"bytes"
	"fmt"
	"mime"

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
// zero value is ready to use.
type Parser struct {
	buf  bytes.Buffer
	text *expfmt.TextParser // reused: each one allocates a read buffer
}

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
func (p *Parser) Parse(format Format, page []byte, filter *Filter) (map[string]*dto.MetricFamily, error) {
	if format == OpenMetrics || filter != nil {
		p.buf.Reset()
		if err := reduce(page, format == OpenMetrics, filter, &p.buf); err != nil {
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

var (
	eofLine     = []byte("# EOF")
	typePrefix  = []byte("# TYPE ")
	textMissing = [][]byte{[]byte("info"), []byte("stateset"), []byte("unknown")}
	suffixes    = [][]byte{[]byte("_bucket"), []byte("_sum"), []byte("_count")}
)

// reduce copies the lines of page that the text parser should see to out:
// for OpenMetrics, reduced to the text format; with a filter, only the lines
// it keeps.
func reduce(page []byte, openMetrics bool, filter *Filter, out *bytes.Buffer) error {
	out.Grow(len(page))
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
		case len(line) > 0 && line[0] == '#':
			if filter != nil {
				continue // HELP, UNIT and plain comments
			}
		case len(line) > 0:
			if filter != nil && !filter.keeps(sampleName(line)) {
				continue
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
	return nil
}

// keeps reports whether the filter keeps a sample of this name. The map
// lookups with string(name) do not allocate.
func (f *Filter) keeps(name []byte) bool {
	if f.Samples[string(name)] {
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
