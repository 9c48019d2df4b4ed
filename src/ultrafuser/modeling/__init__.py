"""Specialists, templates, the fused model and generation."""
