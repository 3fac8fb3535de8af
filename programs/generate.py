"""`ft-prog run generate`: text generation with a KV cache, greedy or sampled, batched with left padding.

:func:`generate` is the decoding loop every program uses (sft's exact-match scoring, eval's
``generate_until``). The program around it reads top to bottom: the model (quantized if asked, a
PEFT adapter on top), the prompts (one, a text file of lines, or JSONL rows with ``"prompt"`` or a
chat's ``"messages"``), chat rendering through the model's template, generation in batches, stop
strings, streaming for a single prompt, and tokens/s at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from ..core import KVCache, Model, Tokenizer, as_dtype, fold_system, load_pretrained, load_tokenizer, read_config
from .config import in_range
from .demo_assets import resolve
from .run_guard import check_output
from .sft_config import ModelSection


@attrs.frozen
class GenerateConfig:
    model: ModelSection = ModelSection()
    adapter: str = ""
    """A PEFT adapter folder (e.g. ``runs/sft/final``) put on the model; empty: none."""
    prompt: str = ""
    prompts_file: str = ""
    """Instead of ``prompt``: a text file (one prompt per line) or JSONL rows with "prompt" or "messages"."""
    chat: bool = False
    """Render each prompt as a user message through the model's chat template (with the generation prompt)."""
    system_prompt: str = ""
    """With ``chat``: a system message put first."""
    fold_system: bool = False
    """With ``chat``: put the system message at the start of the first user turn (templates without a system
    role, e.g. Gemma's)."""
    max_new_tokens: int = attrs.field(default=128, validator=in_range(1))
    temperature: float = attrs.field(default=0.0, validator=in_range(0))
    """0: greedy."""
    top_k: int = attrs.field(default=0, validator=in_range(0))
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = attrs.field(default=1.0, validator=in_range(0, 1, low_open=True))
    """Sample among the smallest set of tokens whose probability reaches top_p (1: all)."""
    seed: int = 0
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    quantize: Literal["", "int8", "int4", "nf4"] = ""
    """Weight-only quantization of the linears; shapes the scheme cannot handle stay unquantized."""
    stop: list[str] = attrs.field(factory=list)
    """Strings that end a completion (cut from the output), besides the tokenizer's stop tokens."""
    stream: bool = True
    """Print the tokens of a single prompt as they come."""
    batch_size: int = attrs.field(default=8, validator=in_range(1))
    output_file: str = ""
    """Also write ``{"prompt", "completion"}`` rows here (JSONL)."""
    overwrite: bool = False
    """Replace an existing ``output_file``."""


CONFIG = GenerateConfig


def next_token_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The fp32 distribution ``[batch, vocab]`` :func:`sample_next` draws from when ``temperature > 0``.

    The logits are divided by the temperature, restricted to the ``top_k`` most
    likely tokens, then to the smallest set whose probability reaches ``top_p``
    (transformers' order: temperature, top-k, top-p), and renormalised.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = logits.masked_fill(~_nucleus(logits.softmax(-1), top_p), float("-inf"))
    return logits.softmax(-1)


def _nucleus(probs: torch.Tensor, top_p: float, first_k: int = 64) -> torch.Tensor:
    """Boolean ``[batch, vocab]``: the most likely tokens of each row until their mass reaches ``top_p`` (the
    token that crosses it included). Usually the most likely ``first_k`` tokens already reach ``top_p`` in every
    row, and a top-k is several times cheaper than sorting the whole vocabulary for every sampled token; a flat
    distribution sorts (x8 larger top-ks first while they stay under a sixteenth of the vocabulary)."""
    vocab = probs.shape[-1]
    k = min(first_k, vocab)
    while True:
        top, order = probs.topk(k, dim=-1) if k < vocab else probs.sort(dim=-1, descending=True)
        mass = top.cumsum(-1)
        if k == vocab or bool((mass[:, -1] >= top_p).all()):
            break
        k = 4 * k if 4 * k <= vocab // 4 else vocab
    keep_sorted = mass - top < top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep_sorted)


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[batch]`` from last-position logits ``[batch, vocab]``.

    ``temperature == 0`` is greedy (argmax); otherwise a draw from :func:`next_token_probs`.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    """``text`` up to the first occurrence of any of the ``stop`` strings (excluded)."""
    ends = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    on_tokens: Callable[[list[int | None]], None] | None = None,
    return_logprobs: bool = False,
    all_steps: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens.

    Prompts are left-padded into one batch; the KV cache holds exactly the
    longest prompt plus ``max_new_tokens``. A sequence ends at its first stop
    token (included in its output) or once ``decode`` of its new tokens
    contains one of ``stop_strings`` (the tokens that wrote it are included;
    cut the text with :func:`cut_at_stop`). ``on_tokens`` receives each step's
    new token per row, None for finished rows (for streaming). Returns the new
    tokens of each prompt; with ``return_logprobs`` also each new token's fp32
    log-probability under ``log_softmax(logits / temperature)`` (temperature 0:
    1), the distribution before top-k / top-p (what a training forward
    recomputes with :func:`ftprog.core.token_logprobs`). ``all_steps``: run
    all ``max_new_tokens`` forwards even once every row has stopped (ranks
    sharing a sharded model must run as many forwards as each other).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode (token ids -> text)")
    longest = max(len(p) for p in prompts)
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of {limit}"
        )
    device, batch = model.device, len(prompts)
    tokens = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, longest + max_new_tokens, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), device=device)
        mask[row, longest - len(prompt):] = 1
    padded = any(len(p) < longest for p in prompts)  # without padding no mask is needed (faster attention)
    cache = KVCache.empty(model.config, batch, longest + max_new_tokens, model.dtype, device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    window = 4 * max((len(s) for s in stop_strings), default=0) + 4  # tokens that can hold a stop string
    head = model.output_layer()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    history = tokens  # every position so far: LongRoPE recomputes the cache once, past its original context
    switch = model.config.rope_switch_length
    for _ in range(max_new_tokens):
        if switch is not None and 0 < cache.length <= switch < cache.length + tokens.shape[1]:
            cache.length, tokens = 0, history  # as transformers: the short-factor keys are stale from here on
        step_mask = mask[:, : cache.length + tokens.shape[1]] if padded else None
        hidden = model.hidden_states(tokens, attention_mask=step_mask, cache=cache)[:, -1]
        logits = model.logits(hidden, output_layer=head)  # the last position only: no [prompt, vocab] logits
        next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        next_ids = torch.where(done, pad_id, next_ids)
        step, finished = next_ids.tolist(), done.tolist()
        if return_logprobs:
            scaled = logits.float() / (temperature if temperature > 0 else 1.0)
            picked = scaled.log_softmax(-1).gather(1, next_ids[:, None]).squeeze(1).tolist()
        for row in range(batch):
            if not finished[row]:
                outputs[row].append(step[row])
                if return_logprobs:
                    logprobs[row].append(picked[row])
                if stop_strings and any(s in decode(outputs[row][-window:]) for s in stop_strings):
                    done[row] = True
        if on_tokens is not None:
            on_tokens([None if d else t for t, d in zip(step, finished)])
        done |= torch.isin(next_ids, stops)
        if done.all() and not all_steps:
            break
        tokens = next_ids[:, None]
        if switch is not None:
            history = torch.cat([history, tokens], dim=1)
    return (outputs, logprobs) if return_logprobs else outputs


# --------------------------------------------------------------------------------------------- the program


def build_model(path: str, *, dtype: str, quantize: str = "", adapter: str = "", device=None) -> Model:
    """Load ``path``, quantize its linears (``""``: no), put the PEFT ``adapter`` folder on it (``""``: none).

    ``path`` may also be a checkpoint written by `ft-prog run quantize` (loaded as it is, quantized).
    """
    from ..transforms import is_quantized_checkpoint, load_adapter, load_quantized
    from ..transforms import quantize as quantize_model

    if is_quantized_checkpoint(path):
        if quantize:
            raise ValueError(f"{path} is already quantized; leave quantize empty")
        model = load_quantized(path, device=device)
    else:
        model = load_pretrained(path, dtype=as_dtype(dtype), device=device)
    if quantize:
        model = quantize_model(model, quantize, skip_unsupported=True)
    if adapter:
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter folder {adapter!r} does not exist; set adapter to a PEFT folder "
                                    "(e.g. the output_dir/final of `ft-prog run sft`), or adapter=\"\" for none")
        try:
            model = load_adapter(model, adapter)
        except ValueError as e:
            raise ValueError(f"cannot put adapter {adapter!r} on {path!r}: {e}") from None
    return model


def read_prompts(cfg: GenerateConfig) -> list[str | list[dict[str, Any]]]:
    """The prompts: strings, or message lists (chats) from JSONL ``"messages"``."""
    if cfg.prompt and cfg.prompts_file:
        raise ValueError("set prompt or prompts_file, not both")
    if not cfg.prompts_file:
        if not cfg.prompt.strip():
            raise ValueError('the prompt is empty: set prompt="..." or prompts_file=FILE')
        return [cfg.prompt]
    file = Path(cfg.prompts_file)
    if not file.is_file():
        raise FileNotFoundError(f"prompts_file {str(file)!r} does not exist")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        prompts: list = lines
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise ValueError(f"{file}:{number}: a JSONL prompt row needs a \"prompt\" or \"messages\" key")
            prompts.append(row["messages"] if "messages" in row else row["prompt"])
    if not prompts or any(isinstance(p, str) and not p.strip() for p in prompts):
        raise ValueError(f"{file}: has no prompts, or an empty one")
    return prompts


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[dict[str, Any]], cfg: GenerateConfig) -> list[int]:
    """Token ids of a prompt: chats through the chat template, text as transformers' ``encode`` would."""
    if isinstance(prompt, list) or cfg.chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if cfg.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        if cfg.fold_system:
            messages = fold_system(messages)
        return tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    return tokenizer.encode(prompt, add_bos=tokenizer.add_bos_token and tokenizer.bos_id is not None)


def _streamer(tokenizer: Tokenizer, stop: list[str]) -> tuple[Callable, Callable[[str], None]]:
    """``(on_tokens, finish)`` printing row 0's text as it grows, holding back what may start a stop string."""
    ids: list[int] = []
    shown = 0
    hold = max((len(s) for s in stop), default=1) - 1

    def show(upto: int, text: str) -> None:
        nonlocal shown
        if upto > shown:
            print(text[shown:upto], end="", flush=True)
            shown = upto

    def on_tokens(step: list[int | None]) -> None:
        if step[0] is None:
            return
        ids.append(step[0])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = cut_at_stop(text, stop)
        safe = len(cut) if len(cut) < len(text) else len(text.rstrip("\ufffd")) - hold  # \ufffd: a partial char
        show(safe, cut)

    def finish(final: str) -> None:
        show(len(final), final)
        print(flush=True)

    return on_tokens, finish


def run(cfg: GenerateConfig, resolved: dict[str, Any] | None = None) -> list[str]:
    """Generate a completion for each prompt; prints them and tokens/s. Returns the completions."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model_path = resolve(cfg.model.path)
    if cfg.output_file:
        check_output(cfg.output_file, sources=[model_path, cfg.adapter], overwrite=cfg.overwrite)
    tokenizer = load_tokenizer(model_path)
    prompts = read_prompts(cfg)
    encoded = [encode_prompt(tokenizer, p, cfg) for p in prompts]
    context = read_config(model_path).max_position_embeddings
    for i, ids in enumerate(encoded):  # before any weights load
        if len(ids) + cfg.max_new_tokens > context:
            raise ValueError(f"prompt {i + 1} has {len(ids)} tokens; with max_new_tokens={cfg.max_new_tokens} that "
                             f"exceeds the model's context of {context} tokens: shorten the prompt or lower "
                             "max_new_tokens")
    model = build_model(model_path, dtype=cfg.dtype, quantize=cfg.quantize, adapter=cfg.adapter, device=device)

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    stream = cfg.stream and len(encoded) == 1
    on_tokens, finish = _streamer(tokenizer, cfg.stop) if stream else (None, None)
    completions, new_tokens = [], 0
    start = time.perf_counter()
    for first in range(0, len(encoded), cfg.batch_size):
        outputs = generate(model, encoded[first : first + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                           stop_ids=tokenizer.stop_ids, pad_id=pad_id, temperature=cfg.temperature,
                           top_k=cfg.top_k or None, top_p=cfg.top_p, seed=cfg.seed + first,
                           stop_strings=cfg.stop, decode=decode, on_tokens=on_tokens)
        new_tokens += sum(len(o) for o in outputs)
        completions += [cut_at_stop(decode(o), cfg.stop) for o in outputs]
    seconds = time.perf_counter() - start

    if stream:
        finish(completions[0])
    else:
        for prompt, completion in zip(prompts, completions):
            shown = prompt if isinstance(prompt, str) else prompt[-1].get("content", "")
            print(f"### prompt: {shown}\n{completion}\n", flush=True)
    if cfg.output_file:
        out = Path(cfg.output_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n"
                               for p, c in zip(prompts, completions)), encoding="utf-8")
    print(f"generated {new_tokens} tokens for {len(encoded)} prompt(s) in {seconds:.2f} s "
          f"({new_tokens / seconds:.1f} tokens/s)", flush=True)
    return completions
