"""The model-backed inference handler: a chat client for Ollama- and OpenAI-compatible
servers (:mod:`.client`) and the handler that gives it an agent's memory as context
(:mod:`.handler`). Used for ``inference`` tasks when ``BLACKROAD_LLM_URL`` is set."""
