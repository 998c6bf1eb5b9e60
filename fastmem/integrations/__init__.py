"""Integrations with transformers / PEFT / TRL."""
