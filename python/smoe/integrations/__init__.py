"""Integrations with other libraries (Hugging Face transformers: smoe.integrations.hf)."""
