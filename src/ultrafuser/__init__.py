"""UltraFuser: fuse highly specialised language models with a token-level gate (arXiv 2403.08281)."""

__version__ = "0.1.0"
