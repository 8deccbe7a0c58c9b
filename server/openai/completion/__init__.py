"""The /v1/completions endpoint: router → protocol → serving."""
