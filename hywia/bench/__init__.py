"""Client-side tooling for measuring OpenAI-compatible servers (this one, `vllm serve`, any other):
start a server process and wait for it, scrape its /metrics, generate load, report latencies.
Nothing here imports FastAPI or the `server` package: it talks to servers over HTTP only."""
