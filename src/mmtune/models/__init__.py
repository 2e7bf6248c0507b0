"""Models: the architecture table, LLM loading, named shapes, partial forwards, and the
LLaVA-style model."""
