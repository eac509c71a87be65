"""The OpenAI-compatible HTTP API: request parsing and validation (``openai_protocol``), response
bodies and SSE framing (``responses``), and the aiohttp application with its handlers (``app``)."""
