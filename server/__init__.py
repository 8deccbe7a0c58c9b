"""The hywia service: an OpenAI-compatible HTTP API in front of a (pruned) model.

Layers, each in its own module, each knowing only the one below it:
  protocol   the OpenAI request/response shapes (pydantic), nothing else
  errors     OpenAI-shaped error bodies and the statuses that go with them
  engines    token ids in, text deltas out: vLLM's AsyncLLM or a built-in torch engine
  prompts    chat template and tokenisation, context-length checks
  generation runs the n choices of one request on an engine, timing and counting them
  serving_*  protocol request → generation → protocol response or SSE stream
  app        routes, auth, error handlers; startup decides what gets served
"""
