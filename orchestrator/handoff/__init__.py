"""Handoffs: the template model, its parser and renderer, and the completed document."""
