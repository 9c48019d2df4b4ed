"""Chat templates: render a conversation for one specialist as the text *around* its assistant replies.

A fused model shows every specialist the same conversation, each in its own template, but all of them
must predict the same reply tokens (paper §2.4). So a template is not asked for one string: it is asked
for the prompt segments `P^1 … P^T`, the text that comes before reply 1, between reply 1 and reply 2, …,
and before the reply still to be generated. The replies themselves are tokenised once, elsewhere
(`ultrafuser.data.conversation`), and shared.

Three kinds of template:

- a format string with one `{instruction}` slot (and optionally `{system}`), like the paper's
  `User: {instruction}\\nAssistant:`; multi-turn: each later turn is `turn_separator + template(user_i)`,
  written right after the previous reply's end-of-reply token;
- a Jinja chat template (a string with `{{` or `{%`), rendered by transformers'
  `apply_chat_template`, which uses a sandboxed Jinja environment (templates cannot run code);
- `None`: the tokenizer's own chat template.

For Jinja templates the segments are found by rendering the conversation with every assistant reply
replaced by a unique sentinel and splitting at the sentinels; the template's end-of-reply marker right
after a reply (e.g. `<|im_end|>`) is the shared end-of-reply token, so it is taken off the next segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ultrafuser.config import TEMPLATE_PRESETS, ConfigError

_SENTINEL = "ULTRAFUSERREPLY{}SENTINEL"


class TemplateError(ConfigError):
    """A conversation or template cannot be rendered; the message names the fix."""


def validate_messages(messages: list[dict], *, final: str) -> None:
    """Check the role sequence: optional system, then user/assistant alternating.

    `final` is the role the conversation must end with: 'assistant' (training) or 'user' (generation).
    """
    if not isinstance(messages, list) or not messages:
        raise TemplateError("a conversation must be a non-empty list of {'role', 'content'} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
            "system",
            "user",
            "assistant",
        ):
            raise TemplateError(
                f"message {i} ({str(m)[:80]!r}) must be {{'role': 'system'|'user'|'assistant', 'content': str}}"
            )
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise TemplateError(
                f"message roles must alternate user/assistant after an optional system message; "
                f"got {m['role']!r} where {want!r} was expected (position {i})"
            )
    if not body:
        raise TemplateError("a conversation needs at least one user message")
    if body[-1]["role"] != final:
        raise TemplateError(f"this conversation must end with a {final!r} message, not {body[-1]['role']!r}")


@dataclass
class PromptRenderer:
    """Renders prompt segments for one specialist. `template` as in `SpecialistConfig.template`."""

    template: str | None
    tokenizer: object  # a transformers tokenizer
    turn_separator: str = "\n"
    eos_text: str | None = None  # the shared end-of-reply token's text, taken off following segments

    def __post_init__(self) -> None:
        if self.template in TEMPLATE_PRESETS:
            self.template = TEMPLATE_PRESETS[self.template]
        self.kind = "tokenizer" if self.template is None else (
            "jinja" if ("{{" in self.template or "{%" in self.template) else "format"
        )
        if self.kind == "tokenizer" and not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError(
                f"tokenizer {getattr(self.tokenizer, 'name_or_path', '?')!r} has no chat template; give the "
                "specialist a template (e.g. template: 'User: {instruction}\\nAssistant:' or a preset name "
                f"{list(TEMPLATE_PRESETS)})"
            )

    def segments(self, messages: list[dict]) -> list[str]:
        """Prompt texts before each assistant reply (and before the next one, if `messages` ends with user)."""
        ends_with_user = messages[-1]["role"] == "user"
        validate_messages(messages, final="user" if ends_with_user else "assistant")
        if self.kind == "format":
            return self._format_segments(messages)
        return self._jinja_segments(messages)

    # ------------------------------------------------------------------ format-string templates
    def _format_segments(self, messages: list[dict]) -> list[str]:
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        body = messages[1:] if system is not None else messages
        has_system_slot = "{system}" in self.template
        out: list[str] = []
        for i, m in enumerate(body):
            if m["role"] != "user":
                continue
            instruction = m["content"]
            if i == 0 and system and not has_system_slot:
                # No {system} slot: the system text leads the first instruction (documented policy).
                instruction = f"{system}\n\n{instruction}"
            fields = {"instruction": instruction}
            if has_system_slot:
                fields["system"] = system or ""
            text = _fill(self.template, fields)
            out.append(text if i == 0 else self.turn_separator + text)
        return out

    # ------------------------------------------------------------------ Jinja chat templates
    def _jinja_segments(self, messages: list[dict]) -> list[str]:
        msgs, n = [], 0
        for m in messages:
            if m["role"] == "assistant":
                msgs.append({"role": "assistant", "content": _SENTINEL.format(n)})
                n += 1
            else:
                msgs.append(dict(m))
        if messages[-1]["role"] == "user":
            msgs.append({"role": "assistant", "content": _SENTINEL.format(n)})
            n += 1
        kwargs = {"tokenize": False, "add_generation_prompt": False}
        if self.kind == "jinja":
            kwargs["chat_template"] = self.template
        try:
            text = self.tokenizer.apply_chat_template(msgs, **kwargs)
        except Exception as e:  # jinja errors, template-raised exceptions
            raise TemplateError(f"the chat template failed to render this conversation: {e}") from e
        segments: list[str] = []
        rest = text
        for i in range(n):
            s = _SENTINEL.format(i)
            if rest.count(s) != 1:
                raise TemplateError(
                    "the chat template changes or repeats assistant replies, so reply tokens cannot be shared "
                    "across specialists; give this specialist a format-string template instead"
                )
            before, rest = rest.split(s, 1)
            if i > 0 and self.eos_text and before.startswith(self.eos_text):
                before = before[len(self.eos_text) :]
            segments.append(before)
        return segments


def _fill(template: str, fields: dict[str, str]) -> str:
    # Not str.format: instruction text may itself contain braces (code!), and the template may contain
    # literal braces around other words. Replace only our slots.
    # One pass, so a slot name inside the inserted text is never substituted again.
    return re.sub(r"\{(instruction|system)\}", lambda m: fields.get(m.group(1), m.group(0)), template)
