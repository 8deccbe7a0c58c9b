"""The OpenAI API, sliced as vLLM's `entrypoints/openai`: shared shapes (`protocol`) and helpers
(`serving`, `generation`), then one package per endpoint with its `router`, `protocol` and `serving`.
"""
