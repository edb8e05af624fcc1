package paged

import (
	"hash/fnv"
	"strings"
)

// A deterministic stand-in for a BPE tokenizer: text is split at white
// space, each word into pieces of at most four bytes (about what BPE
// vocabularies average on English), and a special token such as
// <|eot_id|> is one token. A token's id is a hash of its piece, the same in
// every process, so that equal text is equal tokens on every pod.

const maxPiece = 4

// Tokenize returns the token ids of text.
func Tokenize(text string) []uint32 {
	var out []uint32
	for _, f := range strings.Fields(text) {
		for f != "" {
			n := min(maxPiece, len(f))
			if strings.HasPrefix(f, "<|") {
				if j := strings.Index(f, "|>"); j > 0 {
					n = j + 2
				}
			} else if k := strings.Index(f, "<|"); k > 0 && k < n {
				n = k
			}
			out = append(out, id(f[:n]))
			f = f[n:]
		}
	}
	return out
}

func id(piece string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(piece))
	return h.Sum32()
}

// Message is one chat message.
type Message struct{ Role, Content string }

// ChatTemplate renders messages as Llama 3's chat template does, ending with
// the assistant's header so the model's answer follows.
func ChatTemplate(messages []Message) string {
	var b strings.Builder
	b.WriteString("<|begin_of_text|>")
	for _, m := range messages {
		b.WriteString("<|start_header_id|>" + m.Role + "<|end_header_id|>\n\n" + m.Content + "<|eot_id|>")
	}
	b.WriteString("<|start_header_id|>assistant<|end_header_id|>\n\n")
	return b.String()
}

// words are what the simulated model says, each one token.
var words = []string{"the", "sim", "says", "a", "few", "more", "fine", "word"}

// Word is the text of the i-th generated token, a word and a space.
func Word(i int) string { return words[i%len(words)] + " " }

// WordToken is the id of the i-th generated token: Tokenize(Word(i)).
func WordToken(i int) uint32 { return id(words[i%len(words)]) }
