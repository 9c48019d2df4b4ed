"""Serving: an OpenAI-compatible HTTP API over a fused model, with streaming and per-token gate weights.

Three layers (design.md §3.10): `protocol` (OpenAI request/response models, the error shape, limits),
`handlers` (engine-agnostic: validate, tokenise, format responses and SSE chunks) and `app` (thin routes,
the API-key middleware, the `create_app` factory); `engine` runs the batched decode loop in a background
thread; `cli` is `ultrafuser serve`; `static/index.html` is the chat page at `/` that colours every token by
the specialist the gate weighed most.

Chat templates are rendered by the core (`ultrafuser.modeling.templates`): Jinja templates go through
transformers' `apply_chat_template`, whose Jinja environment is sandboxed (`ImmutableSandboxedEnvironment`),
so a template cannot run code; format-string templates are filled by a plain substitution.
"""

from ultrafuser.serve.protocol import APIError, Limits


def create_app(*args, **kwargs):
    """See `ultrafuser.serve.app.create_app` (imported lazily: FastAPI is the `serve` extra)."""
    from ultrafuser.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["APIError", "Limits", "create_app"]
