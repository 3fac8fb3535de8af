"""Tokenizers read from Hugging Face model folders, with chat templates and assistant masks.

:func:`load_tokenizer` reads one of three formats, tried in this order:

* ``tokenizer.json``: the ``tokenizers`` library (ids identical to transformers' fast tokenizers).
* ``tokenizer.model`` holding a sentencepiece ModelProto (Llama 2, Mistral): ``sentencepiece``, made to behave like
  transformers 5's ``LlamaTokenizer`` (no normalisation; the "▁" prefix is added only at the very start of the text,
  and only if it does not already start with a space; ``legacy: true`` in the config adds it after every special
  token too; ``add_prefix_space: false`` never adds it; decoding drops one leading space). Needs ``protobuf``.
* ``tokenizer.model`` holding tiktoken BPE ranks (Meta's Llama 3 "original" folder, lines of ``base64(token) rank``):
  ``tiktoken`` with Llama 3's split regex and its 256 special tokens, whose ids follow the BPE ranks.

Beside it, ``tokenizer_config.json`` (named special tokens, ``add_bos_token``/``add_eos_token``, ``chat_template``,
``added_tokens_decoder``), ``special_tokens_map.json``, ``chat_template.jinja`` (overrides the config's template, as
in transformers) and ``generation_config.json`` (``eos_token_id``: extra stop ids).

Special tokens written in text (``<|im_end|>``) encode as the special token, as transformers does. Chat templates
render in a sandboxed Jinja environment configured like transformers' ``apply_chat_template``.
"""

from __future__ import annotations

import abc
import base64
import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any, ClassVar, Protocol

import attrs

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""A plain ChatML template, for tokenizers that ship none (``Tokenizer.with_chat_template(CHATML_TEMPLATE)``).

``<|im_start|>``/``<|im_end|>`` are single tokens (and ``<|im_end|>`` a stop token) only if the vocabulary has them;
otherwise they are encoded as ordinary text and no stop token follows assistant turns.
"""

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""The regex Llama 3's tiktoken tokenizer splits text with before BPE."""

_LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + tuple(f"<|reserved_special_token_{i}|>" for i in range(2, 258 - 11))
"""Llama 3 special tokens in id order (ids ``len(ranks) + i``), as Meta's Llama 3.1 tokenizer.py defines them.

Llama 3.0 named ids +2..+5 and +8 ``<|reserved_special_token_k|>`` instead; the ids used by text and chat
(begin/end of text, header ids, ``<|eot_id|>``) are the same. A tokenizer_config.json ``added_tokens_decoder``
next to the file overrides these names id by id.
"""

# Named special tokens (transformers' SPECIAL_TOKENS_ATTRIBUTES): template variables when set.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end a turn or a document; those present as added tokens are stop ids.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>",
                       "<end_of_turn>", "<|end|>")

Span = tuple[int, int]
"""A ``[start, end)`` range of character indices into a string."""


# --------------------------------------------------------------------------------------------------- Tokenizer


@attrs.frozen(eq=False)
class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Build with :func:`load_tokenizer`. Token ids are Python ints in ``[0, vocab_size)``. ``bos_id``/``eos_id``/
    ``pad_id`` are None when the folder names no such token. ``stop_ids`` holds every id that ends generation:
    ``eos_id``, generation_config.json's ``eos_token_id``, and end-of-turn tokens (``<|eot_id|>``, ``<|im_end|>``,
    ``<|end_of_text|>``, ...) that the vocabulary has as special tokens. ``add_bos_token``/``add_eos_token`` say
    what transformers' ``encode(text)`` (``add_special_tokens=True``) adds for this model; :meth:`encode` adds
    nothing unless asked.
    """

    CHATML_TEMPLATE: ClassVar[str] = CHATML_TEMPLATE

    source: str
    """The folder this was loaded from (named in error messages)."""
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_ids: frozenset[int]
    add_bos_token: bool
    add_eos_token: bool
    special_tokens: Mapping[str, str]
    """Named special tokens that are set, e.g. ``{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}``."""
    chat_template: str | None = attrs.field(repr=False)
    _backend: _Backend = attrs.field(repr=False)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; bos/eos are added only when asked (ValueError if the model has none)."""
        ids = self._backend.encode(text)
        if add_bos:
            ids.insert(0, self._need(self.bos_id, "bos"))
        if add_eos:
            ids.append(self._need(self.eos_id, "eos"))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of token ids (any iterable of ints, e.g. a list or a 1-D tensor)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def with_chat_template(self, template: str) -> Tokenizer:
        """A copy that renders chats with the Jinja ``template`` (e.g. :data:`CHATML_TEMPLATE`)."""
        _compile_template(template, self.source)
        return attrs.evolve(self, chat_template=template)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = False) -> str:
        """The chat rendered to text: the same text as transformers' ``apply_chat_template(..., tokenize=False)``.

        ``messages`` are dicts with ``role`` and ``content`` (keys whose value is None are dropped, as in
        transformers). A template error, or the template calling ``raise_exception``, is a ValueError.
        """
        return self._render(_plain_messages(messages, self.source), add_generation_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """``(ids, assistant_mask)`` of the rendered chat, both of length n_tokens.

        ``ids`` encode :meth:`apply_chat_template`'s text with no bos/eos added (the template writes them if it
        wants them), as transformers' ``apply_chat_template(tokenize=True)`` does. ``assistant_mask[i]`` is True for
        the tokens of every assistant message's content (a token straddling the content's edge counts), and for
        the tokens the template writes after it up to and including the first stop id (e.g. ``<|im_end|>``), so
        that training teaches the model to stop. Assistant contents must be strings and appear verbatim (or
        stripped, for templates that ``trim`` them) in the text the template writes for their message; else
        ValueError. Blank assistant contents mask nothing. The template is rendered once per message more, on
        the conversation's prefixes, to find where each message's text starts and ends.
        """
        plain = _plain_messages(messages, self.source)
        text = self._render(plain, add_generation_prompt)
        regions = _assistant_regions(text, plain, self._render, self.source)
        ids, offsets = self._backend.encode_offsets(text)
        return ids, _assistant_mask(ids, offsets, regions, self.stop_ids)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The chat template applied to plain messages; ValueError on any failure."""
        if self.chat_template is None:
            raise ValueError(
                f"{self.source} has no chat_template (no chat_template.jinja, none in tokenizer_config.json); "
                "set one with tokenizer.with_chat_template(template), e.g. "
                "tokenizer.with_chat_template(tokenizer.CHATML_TEMPLATE)")
        template = _compile_template(self.chat_template, self.source)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                   documents=None, **self.special_tokens)
        except Exception as e:  # the template is untrusted code: anything it raises is a template error
            if messages and messages[0]["role"] == "system" and "system" in str(e).lower():
                raise ValueError(f"{self.source}: the chat template has no system role ({e}); set fold_system=true "
                                 "(data.fold_system in sft) to put the system message at the start of the first "
                                 "user turn, or leave the system message out") from e
            raise ValueError(f"{self.source}: chat template failed: {e}") from e

    def _need(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise ValueError(f"{self.source} has no {name} token")
        return token_id


def fold_system(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with a leading system message moved to the start of the first user turn (``system + "\n\n"
    + user``), for chat templates without a system role (Gemma's); unchanged without one. ValueError when no user
    turn follows it."""
    messages = [dict(m) for m in messages]
    if not messages or messages[0].get("role") != "system":
        return messages
    if len(messages) < 2 or messages[1].get("role") != "user":
        raise ValueError("fold_system: the system message is not followed by a user turn to fold it into")
    system, user = messages[0]["content"], messages[1]["content"]
    return [{**messages[1], "content": f"{system}\n\n{user}" if system else user}, *messages[2:]]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of the Hugging Face model folder ``path`` (see the module docstring for formats)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (it should hold the tokenizer files)")
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")
    named = _named_tokens(config, _read_json(folder / "special_tokens_map.json"))
    config_added = _config_added_tokens(config, folder / "tokenizer_config.json")
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, Mapping):  # transformers 5: model-specific named tokens, e.g. {"image_token": "<image>"}
        named |= {k: _token_content(v) for k, v in extra.items()}
        extra = []

    if (folder / "tokenizer.json").is_file():
        backend, defaults = _load_tokenizer_json(folder / "tokenizer.json", config_added)
    elif (folder / "tokenizer.model").is_file():
        backend, defaults = _load_tokenizer_model(folder / "tokenizer.model", config, config_added)
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model")

    named = {k: v for k, v in {**defaults.named, **named}.items() if v is not None}
    backend.ensure_special_tokens([*named.values(), *filter(None, map(_token_content, extra))])
    ids = {k: backend.added[v] for k, v in named.items()}
    bos_id = ids.get("bos_token")
    eos_ids = [i for i in _as_list(generation.get("eos_token_id")) if isinstance(i, int)]
    eos_id = ids.get("eos_token", eos_ids[0] if eos_ids else None)
    stops = {eos_id, *eos_ids} | {backend.added[t] for t in _END_OF_TURN_TOKENS if t in backend.added}
    post = defaults.post_ids
    add_bos = config.get("add_bos_token", defaults.add_bos if post is None else post[:1] == [bos_id])
    add_eos = config.get("add_eos_token", defaults.add_eos if post is None else post[-1:] == [eos_id])
    return Tokenizer(
        source=str(folder), vocab_size=backend.vocab_size, bos_id=bos_id, eos_id=eos_id,
        pad_id=ids.get("pad_token"), stop_ids=frozenset(stops - {None}), add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos), special_tokens=named, chat_template=_chat_template(folder, config),
        backend=backend,
    )


# ------------------------------------------------------------------------------------------------ folder files


@attrs.frozen
class _Defaults:
    """What a tokenizer file implies when tokenizer_config.json is silent."""

    named: Mapping[str, str | None] = attrs.field(factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    post_ids: list[int] | None = None
    """tokenizer.json only: the ids its post-processor gives the empty text, i.e. the bos/eos it adds."""


def _read_json(file: Path) -> dict[str, Any]:
    """Parsed JSON object of ``file``; {} if it does not exist."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _token_content(value: Any) -> str | None:
    """A special token as written in configs: a string, or a dict with ``content``; None if unset."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_tokens(config: Mapping[str, Any], special_map: Mapping[str, Any]) -> dict[str, str | None]:
    """Named special tokens; tokenizer_config.json wins over special_tokens_map.json; None = explicitly unset."""
    named = {k: _token_content(special_map[k]) for k in _NAMED_TOKENS if k in special_map}
    named |= {k: _token_content(config[k]) for k in _NAMED_TOKENS if k in config}
    return named


def _config_added_tokens(config: Mapping[str, Any], file: Path) -> dict[int, tuple[str, bool]]:
    """tokenizer_config.json's ``added_tokens_decoder`` as ``{id: (content, special)}``."""
    try:
        return {int(i): (str(t["content"]), bool(t.get("special", True)))
                for i, t in (config.get("added_tokens_decoder") or {}).items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: malformed added_tokens_decoder: {e}") from e


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, else the config's ``chat_template`` (a string, or named templates: "default")."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    if isinstance(template, Mapping):
        template = template.get("default")
    return template if isinstance(template, str) else None


# ------------------------------------------------------------------------------------------------- backends


class _Backend(Protocol):
    """What :class:`Tokenizer` needs from a tokenizer implementation."""

    vocab_size: int
    added: Mapping[str, int]
    """Added/special tokens that are matched whole in text: content -> id."""

    def ensure_special_tokens(self, tokens: Iterable[str]) -> None:
        """Make each of ``tokens`` a special token (as transformers does for configured ones)."""

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, special tokens in it parsed, no bos/eos added."""

    def encode_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        """Ids of ``text`` (as :meth:`encode`) and each token's character span in ``text``."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Text of ``ids``."""


def _load_tokenizer_json(file: Path, config_added: Mapping[int, tuple[str, bool]]) -> tuple[_Backend, _Defaults]:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tk = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise ValueError(f"{file}: not a valid tokenizer.json: {e}") from e
    backend = _TokenizersBackend(tk)
    for content, special in config_added.values():
        if content not in backend.added:
            backend.add_tokens([content], special)
    return backend, _Defaults(post_ids=backend.post_ids)


class _TokenizersBackend:
    """A ``tokenizers.Tokenizer`` (from tokenizer.json)."""

    def __init__(self, tk: Any):
        tk.no_truncation()
        tk.no_padding()
        self.post_ids: list[int] = tk.encode("", add_special_tokens=True).ids
        # With add_special_tokens=False a post-processor adds no ids, but ByteLevel/Roberta ones trim whitespace
        # off the offsets, which would leave whitespace tokens outside every span; drop it.
        tk.post_processor = None
        self._tk = tk
        self._refresh()

    def _refresh(self) -> None:
        self.added = {t.content: i for i, t in self._tk.get_added_tokens_decoder().items()}
        self.vocab_size = max(self._tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def add_tokens(self, tokens: Iterable[str], special: bool) -> None:
        from tokenizers import AddedToken

        new = [AddedToken(t, special=special, normalized=False) for t in tokens if t not in self.added]
        if new:
            (self._tk.add_special_tokens if special else self._tk.add_tokens)(new)
            self._refresh()

    def ensure_special_tokens(self, tokens: Iterable[str]) -> None:
        self.add_tokens(tokens, special=True)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)


class _SplitBackend(abc.ABC):
    """Base for sentencepiece and tiktoken: added tokens are cut out of the text first, the rest is encoded by the
    library chunk by chunk, and decoding joins each token's bytes (so it needs no library call)."""

    def __init__(self, token_bytes: dict[int, bytes], added: Mapping[int, tuple[str, bool]],
                 lookup: Mapping[bytes, int], strip_first_space: bool):
        """``token_bytes``: id -> bytes of every ordinary token; ``added``: id -> (content, special);
        ``lookup``: bytes -> id of ordinary tokens (a configured special token that is one becomes special);
        ``strip_first_space``: decoding drops one leading space the encoder added (sentencepiece's "▁" prefix)."""
        self._bytes = dict(token_bytes) | {i: content.encode() for i, (content, _) in added.items()}
        self._lookup = lookup
        self._special = {i for i, (_, special) in added.items() if special}
        self.added = {content: i for i, (content, _) in sorted(added.items())}
        self._strip_first_space = strip_first_space
        self._update()

    def _update(self) -> None:
        self.vocab_size = max(self._bytes) + 1
        # Longest first, so that at a given position the longest added token wins (as in tokenizers).
        alternatives = sorted(self.added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, alternatives)) or "(?!)")

    def ensure_special_tokens(self, tokens: Iterable[str]) -> None:
        for token in tokens:
            if token not in self.added:
                token_id = self._lookup.get(token.encode(), self.vocab_size)
                self._bytes[token_id] = token.encode()
                self.added[token] = token_id
                self._update()
            self._special.add(self.added[token])

    def encode(self, text: str) -> list[int]:
        return self._encode(text, offsets=False)[0]

    def encode_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        return self._encode(text, offsets=True)

    def _encode(self, text: str, offsets: bool) -> tuple[list[int], list[Span]]:
        ids: list[int] = []
        spans: list[Span] = []
        pos = 0
        for m in [*self._added_re.finditer(text), None]:
            end = len(text) if m is None else m.start()
            if end > pos:
                chunk_ids, chunk_spans = self._encode_chunk(text[pos:end], pos == 0, offsets)
                ids += chunk_ids
                spans += [(pos + a, pos + b) for a, b in chunk_spans]
            if m is not None:
                ids.append(self.added[m.group()])
                spans.append(m.span())
                pos = m.end()
        return ids, spans

    @abc.abstractmethod
    def _encode_chunk(self, chunk: str, at_start: bool, offsets: bool) -> tuple[list[int], list[Span]]:
        """Ids of a text without added tokens (``at_start``: it begins the whole text), and char spans in it
        if ``offsets`` (else an empty list)."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special]
        try:
            data = b"".join(self._bytes[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (size {self.vocab_size})") from None
        text = data.decode("utf-8", errors="replace")
        # Like transformers' Strip decoder, which sees the whole text, special tokens included.
        return text[1:] if self._strip_first_space and text.startswith(" ") else text


def _char_spans(text: str, byte_spans: Iterable[Span]) -> list[Span]:
    """Map ``[start, end)`` byte ranges of ``text.encode()`` to the char ranges that contain them."""
    starts = list(accumulate((len(c.encode()) for c in text), initial=0))  # byte offset of each char, then total
    return [(bisect_right(starts, b0) - 1, bisect_left(starts, b1)) for b0, b1 in byte_spans]


def _load_tokenizer_model(file: Path, config: Mapping[str, Any],
                          config_added: Mapping[int, tuple[str, bool]]) -> tuple[_Backend, _Defaults]:
    """A tokenizer.model: a sentencepiece ModelProto if sentencepiece can load it, else tiktoken BPE ranks."""
    import sentencepiece

    data = file.read_bytes()
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError):
        sp = None
    if sp is not None:
        prepend = ("never" if config.get("add_prefix_space") is False
                   else "always" if config.get("legacy", False) else "first")
        named = {k: sp.id_to_piece(i) for k, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                    ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id()))
                 if i >= 0}
        # Without an add_bos_token key transformers 5 adds no bos; Llama 2 and Mistral were trained with one.
        return (_SentencePieceBackend(file, data, config_added, prepend),
                _Defaults(named=named, add_bos=True, add_eos=False))
    ranks = _read_tiktoken_ranks(file, data)
    n = len(ranks)
    added = {n + i: (t, True) for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)} | dict(config_added)
    named = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    return _TiktokenBackend(file, ranks, added), _Defaults(named=named, add_bos=True, add_eos=False)


def _read_tiktoken_ranks(file: Path, data: bytes) -> dict[bytes, int]:
    """tiktoken's BPE file format (``base64(token) rank`` per line), parsed here rather than with
    ``tiktoken.load.load_tiktoken_bpe``, which caches local files by path and so can return stale ranks."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{file}: neither a sentencepiece model nor tiktoken BPE ranks "
                                 f"(line {n}: {line[:40]!r})") from e
    if not ranks:
        raise ValueError(f"{file}: empty tokenizer.model")
    return ranks


class _TiktokenBackend(_SplitBackend):
    """tiktoken BPE ranks with Llama 3's split regex."""

    def __init__(self, file: Path, ranks: dict[bytes, int], added: Mapping[int, tuple[str, bool]]):
        import tiktoken

        self._enc = tiktoken.Encoding(name=str(file), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={})
        super().__init__({i: t for t, i in ranks.items()}, added, ranks, strip_first_space=False)

    def _encode_chunk(self, chunk: str, at_start: bool, offsets: bool) -> tuple[list[int], list[Span]]:
        ids = self._enc.encode_ordinary(chunk)
        if not offsets:
            return ids, []
        ends = list(accumulate(len(self._bytes[i]) for i in ids))
        return ids, _char_spans(chunk, zip([0, *ends[:-1]], ends, strict=True))


class _SentencePieceBackend(_SplitBackend):
    """A sentencepiece model, encoding like transformers 5's LlamaTokenizer (see the module docstring)."""

    def __init__(self, file: Path, data: bytes, config_added: Mapping[int, tuple[str, bool]], prepend: str):
        import sentencepiece

        try:
            from sentencepiece import sentencepiece_model_pb2, sentencepiece_pb2
        except ImportError as e:
            raise ImportError(f"{file}: reading a sentencepiece tokenizer.model needs the protobuf package "
                              "(pip install protobuf)") from e
        proto = sentencepiece_model_pb2.ModelProto.FromString(data)
        # transformers converts the model without its normaliser and adds the "▁" prefix itself: do the same.
        spec = proto.normalizer_spec
        spec.name, spec.precompiled_charsmap = "identity", b""
        spec.add_dummy_prefix = spec.remove_extra_whitespaces = False
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._text_proto = sentencepiece_pb2.SentencePieceText
        self._prepend = prepend
        kinds = proto.SentencePiece.Type
        token_bytes, lookup, added = {}, {}, {}
        for i, piece in enumerate(proto.pieces):
            if piece.type in (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED):
                # transformers makes control pieces and <unk> special added tokens, user-defined ones plain added.
                added[i] = (piece.piece, piece.type != kinds.USER_DEFINED)
            elif piece.type == kinds.BYTE:  # "<0xAB>"
                token_bytes[i] = bytes([int(piece.piece[3:5], 16)])
            else:
                token_bytes[i] = piece.piece.replace("▁", " ").encode()
                lookup[piece.piece.encode()] = i
        super().__init__(token_bytes, added | dict(config_added), lookup, strip_first_space=prepend != "never")

    def _encode_chunk(self, chunk: str, at_start: bool, offsets: bool) -> tuple[list[int], list[Span]]:
        # The prefix is skipped when the text starts with a space or a literal "▁" (which sentencepiece reads as one).
        shift = int((self._prepend == "always" or (self._prepend == "first" and at_start))
                    and not chunk.startswith((" ", "▁")))
        text = " " * shift + chunk
        if not offsets:
            return self._sp.encode(text), []
        pieces = self._text_proto.FromString(self._sp.encode(text, out_type="serialized_proto")).pieces
        spans = _char_spans(text, [(p.begin, p.end) for p in pieces])
        return [p.id for p in pieces], [(max(a - shift, 0), max(b - shift, 0)) for a, b in spans]


# ------------------------------------------------------------------------------------------------ chat


@lru_cache(maxsize=1)
def _jinja_env() -> Any:
    """A sandboxed Jinja environment configured like transformers' chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` marker; renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=16)
def _compile_template(template: str, source: str) -> Any:
    """The compiled Jinja template; a syntax error is a ValueError naming ``source``."""
    import jinja2

    try:
        return _jinja_env().from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"{source}: invalid chat template: {e}") from e


def _plain_messages(messages: Sequence[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
    """Messages as plain dicts without None values (transformers drops those too); ValueError if none."""
    items = None if isinstance(messages, (str, Mapping)) else list(messages)
    if items is None or not all(isinstance(m, Mapping) for m in items):
        raise ValueError(f"{source}: messages must be a list of dicts with 'role' and 'content'")
    if not items:
        raise ValueError(f"{source}: cannot apply a chat template to an empty conversation")
    return [{k: v for k, v in m.items() if v is not None} for m in items]


def _assistant_regions(text: str, messages: list[dict[str, Any]], render: Callable[[list[dict[str, Any]], bool], str],
                       source: str) -> list[tuple[int, int, int]]:
    """``(start, end, limit)`` for each assistant message with non-blank content: the content's char span in
    ``text``, and where the template's output for that message ends (the stop token closing the turn must start
    before it).

    ``render(messages, add_generation_prompt)`` renders a conversation. Each message's content is searched for
    verbatim, else stripped (for templates that trim), only in the text the template wrote for that message:
    after the rendering of the messages before it (with the generation prompt, for an assistant message) and
    before the rendering that ends with it, when those renderings are prefixes of ``text`` (true of most
    templates). Where they are not, the search runs forward from the previous content found, and a turn ends
    where the next content found starts.
    """

    def prefix_end(upto: int, generation_prompt: bool) -> int | None:
        try:
            head = render(messages[:upto], generation_prompt)
        except ValueError:  # e.g. a template that refuses a conversation without a user message
            return None
        return len(head) if text.startswith(head) else None

    ends = [prefix_end(j, False) for j in range(len(messages) + 1)]  # ends[j]: where message j's output starts
    located: list[tuple[int, int, int]] = []  # (start, end, message index)
    cursor = 0
    for j, message in enumerate(messages):
        content, is_assistant = message.get("content"), message.get("role") == "assistant"
        if is_assistant and not isinstance(content, str):
            raise ValueError(f"{source}: assistant message {j} has non-string content; encode_chat "
                             "needs string contents")
        if not isinstance(content, str) or not content.strip():
            continue
        lo = max(cursor, ends[j] or 0, (prefix_end(j, True) or 0) if is_assistant else 0)
        hi = len(text) if ends[j + 1] is None else ends[j + 1]
        span = next(((p, p + len(s)) for s in (content, content.strip()) if (p := text.find(s, lo, hi)) >= 0), None)
        if span is None:
            if is_assistant:
                raise ValueError(f"{source}: the content of assistant message {j} ({content[:50]!r}) is not in "
                                 "the rendered chat; the template changes it, so it cannot be masked")
            continue
        located.append((*span, j))
        cursor = span[1]
    return [(start, end, ends[j + 1] if ends[j + 1] is not None
             else located[k + 1][0] if k + 1 < len(located) else len(text))
            for k, (start, end, j) in enumerate(located) if messages[j].get("role") == "assistant"]


def _assistant_mask(ids: list[int], offsets: list[Span], regions: list[tuple[int, int, int]],
                    stop_ids: frozenset[int]) -> list[bool]:
    """True for tokens overlapping a region's ``[start, end)``, plus the tokens after it through the first stop
    id that starts before the region's limit (none if no stop id comes first)."""
    n = len(ids)
    mask = [False] * n
    k = 0
    for start, end, limit in regions:
        while k < n and max(offsets[k][1], offsets[k][0] + 1) <= start:  # wholly before the content
            k += 1
        while k < n and offsets[k][0] < end:
            mask[k] = True
            k += 1
        j = k
        while j < n and offsets[j][0] < limit and ids[j] not in stop_ids:
            j += 1
        if j < n and offsets[j][0] < limit:
            mask[k:j + 1] = [True] * (j + 1 - k)
            k = j + 1
    return mask
