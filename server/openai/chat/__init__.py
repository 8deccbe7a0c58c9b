"""The /v1/chat/completions endpoint: router → protocol → serving."""
