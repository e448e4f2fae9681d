"""The LLM runtime: loading, generation and the embedded tiny model."""
