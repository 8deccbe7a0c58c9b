"""The hywia service: an OpenAI-compatible HTTP API in front of a (pruned) model.

Only what the service runs lives here (client tooling is in `hywia.bench`):
  app        routes, access control, error handlers; includes each endpoint's router
  state      the start-up phase, the served models, the metrics (what the routes read)
  startup    decides what gets served: prune or load the export, start the engines
  limits     body size and concurrent generations
  metrics    the hywia_* Prometheus series
  errors     OpenAI-shaped error bodies and the statuses that go with them
  registry   the served models by id
  openai     the API as vLLM slices it: shared shapes and helpers, then chat/ and completion/,
             each with its router → protocol → serving
  engines    token ids in, text deltas out: vLLM's AsyncLLM or a built-in torch engine
"""
