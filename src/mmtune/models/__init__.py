"""Model families (architecture table) and, later, LLM and encoder loading."""
