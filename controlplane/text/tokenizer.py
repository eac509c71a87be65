"""The gateway's view of the model directory: tokenizer, chat template, sampling defaults.

Token ids must be exactly those vLLM's own OpenAI server would feed the engine, or prefix caching
and the disaggregated-equals-single-engine guarantee break. vLLM 0.32 does:
- completions: `tokenizer.encode(prompt, add_special_tokens=True)`;
- chat: render the template to a string (`apply_chat_template(..., add_generation_prompt=True,
  tokenize=False)`), then `encode(text, add_special_tokens=False)` (the template adds BOS itself).
  Message content given as text parts is joined with "\\n" when the template treats content as a
  string, and passed as a list of {"type": "text"} parts when the template iterates over it.
  A "developer" message becomes "system" when the template does not mention the developer role.
- output text: one incremental detokenizer over all generated tokens, primed with the prompt
  (`new_detokenizer`; why the gateway and not the workers: detokenizer.py).
These rules are repeated here rather than imported: the control plane never imports vLLM.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import jinja2

from controlplane.api.openai_protocol import ChatMessage, OpenAIError
from controlplane.api.sampling import SamplingDefaults
from controlplane.text.detokenizer import IncrementalDetokenizer

__all__ = ["ModelTokenizer", "read_sampling_defaults"]

logger = logging.getLogger(__name__)

# vLLM walks the template's AST for a loop over message content; a regex over the source finds
# the same loops in the templates seen in practice ("for part in message['content']").
_ITERATES_CONTENT_RE = re.compile(
    r"\bfor\s+\w+\s+in\s+\w+(?:\[\s*['\"]content['\"]\s*\]|\.content)(?!\w)"
)


class ModelTokenizer:
    """Tokenizes prompts and chat conversations with the model's own HF tokenizer."""

    __slots__ = (
        "_chat_template",
        "_content_as_parts",
        "_has_developer_role",
        "_space_marker",
        "_tokenizer",
        "eos_token_ids",
        "max_token_chars",
    )

    def __init__(self, tokenizer: Any, *, extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids: frozenset[int] = frozenset(
            (eos,) if isinstance(eos, int) else ()
        ).union(extra_eos_token_ids)
        """Tokens that end a sequence: the tokenizer's EOS and generation_config's eos_token_id."""
        template = getattr(tokenizer, "chat_template", None)
        self._chat_template: str | None = template if isinstance(template, str) else None
        source = self._chat_template or ""
        self._content_as_parts = _ITERATES_CONTENT_RE.search(source) is not None
        self._has_developer_role = "developer" in source
        self.max_token_chars: int = _longest_token(tokenizer)
        """No token of the vocabulary stands for more characters than this (0: unknown)."""
        self._space_marker = _metaspace_marker(tokenizer)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelTokenizer:
        from transformers import AutoTokenizer  # slow import (~3 s): only when a gateway starts

        return cls(
            AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True),
            extra_eos_token_ids=_read_generation_config_eos(model_dir),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (base vocabulary plus added tokens)."""
        return len(self._tokenizer)

    def new_detokenizer(self, prompt_token_ids: list[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._tokenizer.backend_tokenizer, prompt_token_ids)

    def encode_prompt(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completions prompt, special tokens added as vLLM does (unless
        ``add_special_tokens`` is False: /tokenize's option)."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each id's vocabulary entry (byte-level BPE spells a space as "Ġ"): /tokenize's
        ``return_token_strs``."""
        strings: list[str] = self._tokenizer.convert_ids_to_tokens(token_ids)
        return strings

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's text alone, as vLLM names tokens in logprobs: the id decoded by itself,
        with the leading spaces a SentencePiece (Metaspace) vocabulary entry stands for, which
        decoding a lone token strips."""
        texts: list[str] = [self._tokenizer.decode([t]) or "" for t in token_ids]
        marker = self._space_marker
        if marker is None:
            return texts
        pieces = self._tokenizer.convert_ids_to_tokens(list(token_ids))
        for i, piece in enumerate(pieces):
            spaces = len(piece) - len(piece.lstrip(marker)) if piece else 0
            missing = spaces - (len(texts[i]) - len(texts[i].lstrip(" ")))
            if missing > 0:
                texts[i] = " " * missing + texts[i]
        return texts

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``, special tokens included (as vLLM's /detokenize)."""
        text: str = self._tokenizer.decode(token_ids)
        return text

    def render_chat(
        self,
        messages: tuple[ChatMessage, ...],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text the chat template makes of `messages`, ending with the assistant cue
        (or, with ``continue_final_message``, open at the end of the last message); ``tools``
        (OpenAI's form) go to the template as its ``tools``, as vLLM passes them."""
        if self._chat_template is None:
            raise OpenAIError(
                "This model's tokenizer has no chat template; use /v1/completions instead.",
                param="messages",
                code="chat_template_missing",
            )
        conversation = [self._message_dict(m) for m in messages]
        try:
            text = self._tokenizer.apply_chat_template(
                conversation,
                chat_template=self._chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                tools=tools,
            )
        except (jinja2.TemplateError, TypeError) as exc:
            # Templates reject conversations with raise_exception(...), e.g. roles that do not
            # alternate: that is the client's request, not a server fault.
            raise OpenAIError(
                f"The chat template rejected the messages: {exc}",
                param="messages",
                code="invalid_messages",
            ) from exc
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text

    def encode_chat(
        self, messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of a chat prompt: the rendered template, no extra special tokens."""
        return self.encode_rendered_chat(self.render_chat(messages, tools=tools))

    def encode_rendered_chat(self, text: str) -> list[int]:
        """Token ids of a chat prompt that `render_chat` made."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def _message_dict(self, message: ChatMessage) -> dict[str, Any]:
        role = message.role
        if role == "developer" and not self._has_developer_role:
            role = "system"
        content: str | list[dict[str, str]]
        if message.role == "tool":  # always text, as vLLM's server gives a tool's result
            content = (
                message.content if isinstance(message.content, str) else "\n".join(message.content)
            )
        elif isinstance(message.content, str):
            content = (
                [{"type": "text", "text": message.content}]
                if self._content_as_parts
                else message.content
            )
        elif self._content_as_parts:
            content = [{"type": "text", "text": text} for text in message.content]
        else:
            content = "\n".join(message.content)
        result: dict[str, Any] = {"role": role, "content": content}
        if message.name is not None:
            result["name"] = message.name
        if message.tool_calls:
            result["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": _arguments(arguments)},
                }
                for call_id, name, arguments in message.tool_calls
            ]
        if message.tool_call_id is not None:
            result["tool_call_id"] = message.tool_call_id
        return result


def _arguments(text: str) -> dict[str, Any]:
    """A call's arguments as chat templates read them: the JSON object itself (templates write
    ``arguments | tojson`` or iterate ``arguments.items()``); anything else an empty object, as
    vLLM's server hands them over."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _metaspace_marker(tokenizer: Any) -> str | None:
    """The character a SentencePiece-style (Metaspace) pre-tokenizer writes for a space (None
    for byte-level and other vocabularies, whose lone tokens decode with their spaces)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        config = json.loads(backend.to_str()) if backend is not None else {}
    except (ValueError, AttributeError):
        return None
    pre = config.get("pre_tokenizer") or {}
    for step in [pre, *(pre.get("pretokenizers") or [])]:
        if isinstance(step, dict) and step.get("type") == "Metaspace":
            marker = step.get("replacement", "\u2581")
            return marker if isinstance(marker, str) and marker else None
    return None


def _longest_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for: the longest entry of the vocabulary
    (added tokens included). A vocabulary entry is never shorter than its text: byte-level BPE
    spells each byte with one symbol (and a character is at least one byte), SentencePiece each
    character with one ("▁" for a space), byte-fallback tokens as "<0xNN>"."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return 0
    vocab = get_vocab()
    return max((len(token) for token in vocab), default=0) if isinstance(vocab, dict) else 0


def _read_generation_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return config if isinstance(config, dict) else {}


def _read_generation_config_eos(model_dir: Path) -> tuple[int, ...]:
    eos = _read_generation_config(model_dir).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


_GENERATION_DEFAULTS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
"""The generation_config.json fields vLLM takes as a request's defaults (its
``ModelConfig.get_diff_sampling_param``), ``max_new_tokens`` aside."""


def read_sampling_defaults(model_dir: Path) -> SamplingDefaults:
    """Sampling defaults from the model's generation_config.json, as vLLM applies them
    (`--generation-config auto`, its default): `_GENERATION_DEFAULTS`."""
    config = _read_generation_config(model_dir)
    defaults = SamplingDefaults()
    values: dict[str, float] = {}
    for name in _GENERATION_DEFAULTS:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            logger.warning("generation_config.json: %s=%r is not a number; ignored", name, value)
            continue
        values[name] = value
    top_k = int(values.pop("top_k", defaults.top_k))
    return replace(defaults, top_k=max(0, top_k), **{k: float(v) for k, v in values.items()})
