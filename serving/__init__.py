"""The OpenAI-compatible server: `codellama-serve` (or `python -m codellama_jax.serving`)."""
