// Renders Ollama Modelfile templates the way Ollama does (Go text/template over .System and .Messages), so the tests
// can compare them with the Jinja chat templates they translate. Reads a JSON list of cases on stdin and writes the
// JSON list of rendered texts (or "ERROR: ..." for a case that fails) on stdout.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := make([]string, 0, len(cases))
	for _, c := range cases {
		t, err := template.New("t").Parse(c.Template)
		if err != nil {
			out = append(out, "ERROR: "+err.Error())
			continue
		}
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"System": c.System, "Messages": c.Messages}); err != nil {
			out = append(out, "ERROR: "+err.Error())
			continue
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
