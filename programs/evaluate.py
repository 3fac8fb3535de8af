"""`ft-prog run eval`: lm-evaluation-harness tasks and fast perplexity on any ft-prog model.

:class:`FtProgLM` implements lm-eval's LM interface (``TemplateLM``) over a :class:`~ftprog.core.Model`
(base, with an adapter, merged or quantized): batched log-likelihoods, rolling log-likelihoods
(perplexity tasks) and ``generate_until`` through :func:`ftprog.programs.generate.generate`. Special
tokens, context/continuation splits, left truncation and rolling windows are handled as lm-eval's
Hugging Face backend (``lm_eval.models.huggingface.HFLM``) handles them, so scores are the same.

The program: check the task names (unknown ones get close matches), load the model (quantized if asked,
adapter on top), run ``lm_eval.simple_evaluate``, print lm-eval's table, and compute a file's
perplexity without lm-eval (:func:`ftprog.core.perplexity`: token-weighted, sliding windows; the same
computation ``run quantize`` reports).
Everything lands in ``output_dir/eval_results.json``.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import re
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..core import Model, Tokenizer, load_tokenizer, perplexity
from ..core._checkpoint import atomic_folder
from .config import in_range, to_dict
from .demo_assets import resolve
from .generate import build_model, generate
from .run_guard import check_output
from .sft_config import ModelSection


@attrs.frozen
class EvalConfig:
    model: ModelSection = ModelSection()
    adapter: str = ""
    """A PEFT adapter folder put on the model; empty: none."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    quantize: Literal["", "int8", "int4", "nf4"] = ""
    tasks: list[str] = attrs.field(factory=list)
    """lm-eval task, group or tag names (globs and YAML paths work too)."""
    include_path: str = ""
    """A folder of extra task YAML files (e.g. local JSONL tasks)."""
    num_fewshot: int | None = attrs.field(default=None, validator=in_range(0))
    limit: int | float | None = attrs.field(default=None, validator=in_range(0, low_open=True))
    """Samples per task (a float below 1: a fraction). For quick checks only."""
    batch_size: int = attrs.field(default=8, validator=in_range(1))
    max_length: int = attrs.field(default=0, validator=in_range(0))
    """Tokens per forward (0: the model's max_position_embeddings); longer inputs are truncated from the left."""
    max_gen_toks: int = attrs.field(default=256, validator=in_range(1))
    """Default generation length of generate_until tasks that set none."""
    add_bos_token: bool | None = None
    """As lm-eval's ``add_bos_token`` model argument; unset: the tokenizer's own default."""
    apply_chat_template: bool = False
    log_samples: bool = False
    """Also write every sample's requests and scores to ``output_dir/samples_TASK.jsonl``."""
    perplexity_file: str = ""
    """A .txt file (one document) or .jsonl (a document per row's "text") to compute perplexity on."""
    stride: int = attrs.field(default=0, validator=in_range(0))
    """Perplexity windows of max_length tokens start this many tokens apart, < max_length (0: max_length // 2)."""
    seed: int = 0
    output_dir: str = "runs/eval"
    overwrite: bool = False
    """Replace an existing, non-empty ``output_dir``."""


CONFIG = EvalConfig


class FtProgLM(TemplateLM):
    """lm-eval's LM interface over an ft-prog model and tokenizer (causal, batched)."""

    def __init__(self, model: Model, tokenizer: Tokenizer, *, batch_size: int = 8, max_length: int = 0,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, seed: int = 0):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_gen_toks, self.seed = batch_size, max_gen_toks, seed
        self.add_bos_token = add_bos_token
        self._max_length = max_length or model.config.max_position_embeddings

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return eos if eos is not None else min(self.tokenizer.stop_ids, default=0)

    @property
    def prefix_token_id(self) -> int:
        """The token that stands in for an empty context (and starts rolling windows): BOS, else EOS."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.source.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As HFLM: ``add_special_tokens`` falls back to ``add_bos_token``, then to the tokenizer's default;
        a string that already starts with the prefix token's text gets no special tokens."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tok_decode([self.prefix_token_id], False)):
            special = False
        ids = self._encode(string, True if special is None else special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode(self, string: str, special: bool) -> list[int]:
        """transformers' ``encode(string, add_special_tokens=special)`` (``add_bos_token`` overriding the default)."""
        tok = self.tokenizer
        add_bos = self.add_bos_token if self.add_bos_token is not None else tok.add_bos_token
        return tok.encode(string, add_bos=special and add_bos and tok.bos_id is not None,
                          add_eos=special and tok.add_eos_token and tok.eos_id is not None)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """``(sum of log p(continuation), continuation is the greedy one)`` per ``(key, context, continuation)``.

        Inputs are ``(context + continuation)[-(max_length + 1):][:-1]``, longest first, right-padded
        into batches; only the continuation positions go through the output layer.
        """
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for _, context, continuation in requests:
            if not context or not 0 < len(continuation) <= self.max_length:
                raise ValueError(f"cannot score a continuation of {len(continuation)} tokens after {len(context)} "
                                 f"tokens of context with max_length={self.max_length}")
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        head = self.model.output_layer()
        for first in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = order[first : first + self.batch_size]
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in chunk]
            width = max(map(len, inputs))
            tokens = torch.tensor([row + [0] * (width - len(row)) for row in inputs], device=self.model.device)
            hidden = self.model.hidden_states(tokens)
            for row, i in enumerate(chunk):
                key, _, continuation = requests[i]
                end = len(inputs[row])
                logits = self.model.logits(hidden[row, end - len(continuation) : end], output_layer=head)
                logprobs = logits.float().log_softmax(-1)
                target = torch.tensor(continuation, device=logprobs.device)
                score = logprobs.gather(-1, target[:, None]).sum().item()
                results[i] = (score, bool((logprobs.argmax(-1) == target).all()))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of ``max_length`` tokens, the first after the prefix."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[index] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _encode_context(self, text: str) -> list[int]:
        """A generation context, encoded as HFLM's ``tok_batch_encode`` does."""
        bos = self.tokenizer.special_tokens.get("bos_token")
        if bos is not None and text.startswith(bos):
            return self._encode(text, False)
        return self._encode(text, True if self.add_bos_token is None else self.add_bos_token)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) completions cut at the ``until`` strings and at the EOS text, in batches
        of requests that share generation arguments, longest context first."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        tok = self.tokenizer
        pad_id = next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)
        results = [""] * len(args)
        progress = tqdm(total=len(args), disable=disable_tqdm, desc="generate_until")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(args[indices[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be below max_length={self.max_length}")
            sample = bool(kwargs.get("do_sample")) and kwargs.get("temperature", 0.0) > 0
            contexts = {i: self._encode_context(args[i][0])[-(self.max_length - max_new) :] for i in indices}
            indices = sorted(indices, key=lambda i: -len(contexts[i]))
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first : first + self.batch_size]
                outputs = generate(self.model, [contexts[i] for i in chunk], max_new_tokens=max_new,
                                   stop_ids=tok.stop_ids, pad_id=pad_id,
                                   temperature=kwargs.get("temperature", 0.0) if sample else 0.0,
                                   top_k=kwargs.get("top_k") if sample else None,
                                   top_p=kwargs.get("top_p") if sample else None,
                                   seed=self.seed + first if sample else None,
                                   stop_strings=until, decode=self.tok_decode)
                for i, ids in zip(chunk, outputs):
                    results[i] = postprocess_generated_text(self.tok_decode(ids), stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", args[i], results[i])
                progress.update(len(chunk))
        progress.close()
        return results

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and chat_history:  # continue the final message: cut what follows its content
            last = chat_history[-1]["content"]
            text = text[: text.rindex(last) + len(last)] if last and last in text else text
        return text

    def get_model_info(self) -> dict[str, Any]:
        return {"model_source": self.model.source, "model_num_parameters": self.model.num_params(),
                "model_dtype": str(self.model.dtype)}


# ----------------------------------------------------------------------------------------------- perplexity


def read_documents(path: str) -> list[str]:
    """A .txt file is one document; a .jsonl file has one per row (its "text")."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"perplexity_file {path!r} does not exist")
    if file.suffix != ".jsonl":
        return [file.read_text(encoding="utf-8")]
    docs = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{file}:{number}: a perplexity row needs a \"text\" string")
            docs.append(row["text"])
    return docs


# ------------------------------------------------------------------------------------------------ the program


@functools.cache
def task_manager(include_path: str = ""):
    """lm-eval's TaskManager (built-in tasks plus ``include_path``); indexing takes seconds, so it is kept."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None)


def python_run_by(include_path: str) -> list[str]:
    """A notice for each Python file that the task YAMLs of ``include_path`` run (lm-eval's ``!function``)."""
    notes = []
    for yaml_file in sorted(Path(include_path).rglob("*.y*ml")):
        text = yaml_file.read_text(encoding="utf-8", errors="replace")
        modules = sorted(set(re.findall(r"!function\s+([\w.]+)\.\w+", text)))
        notes += [f"note: task {yaml_file} runs Python code from {yaml_file.parent / (m.replace('.', '/') + '.py')} "
                  "(lm-eval's !function)" for m in modules]
    return notes


def check_tasks(names: list[str], manager) -> None:
    """Unknown task names are an error listing close matches."""
    known = manager.all_tasks
    for name in names:
        if name in known or Path(name).is_file() or ("*" in name and fnmatch.filter(known, name)):
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown lm-eval task {name!r}{hint} (`lm-eval ls tasks` lists them; local task "
                         "YAML files go in a folder given as include_path)")


def run(cfg: EvalConfig, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate; prints the results table and writes ``output_dir/eval_results.json``. Returns the results."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    if not cfg.tasks and not cfg.perplexity_file:
        raise ValueError("nothing to evaluate: set tasks=[...] and/or perplexity_file=FILE")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model_path = resolve(cfg.model.path)
    out = Path(cfg.output_dir)
    check_output(out, sources=[model_path, cfg.adapter, cfg.include_path], overwrite=cfg.overwrite)
    tokenizer = load_tokenizer(model_path)
    if cfg.tasks and cfg.include_path:
        for note in python_run_by(cfg.include_path):
            print(note, flush=True)
    manager = task_manager(cfg.include_path) if cfg.tasks else None
    if manager is not None:
        check_tasks(cfg.tasks, manager)  # before any weights load
    documents = read_documents(cfg.perplexity_file) if cfg.perplexity_file else []
    model = build_model(model_path, dtype=cfg.dtype, quantize=cfg.quantize, adapter=cfg.adapter, device=device)
    lm = FtProgLM(model, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                  max_gen_toks=cfg.max_gen_toks, add_bos_token=cfg.add_bos_token, seed=cfg.seed)

    results: dict[str, Any] = {}
    samples = {}
    if cfg.tasks:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=manager,
            log_samples=cfg.log_samples, apply_chat_template=cfg.apply_chat_template, random_seed=cfg.seed,
        )
        samples = results.pop("samples", None) or {}
        results["config"].update(model=cfg.model.path, adapter=cfg.adapter or None, quantize=cfg.quantize or None)
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    if documents:
        add_bos = tokenizer.add_bos_token and tokenizer.bos_id is not None
        ids = [tokenizer.encode(d, add_bos=add_bos) for d in documents]
        results["perplexity"] = {"file": cfg.perplexity_file,
                                 **perplexity(model, ids, max_length=lm.max_length, stride=cfg.stride or None,
                                              batch_size=cfg.batch_size)}
        p = results["perplexity"]
        print(f"perplexity of {cfg.perplexity_file}: {p['perplexity']:.4f} ({p['tokens']} tokens, "
              f"{p['documents']} documents, windows of {p['max_length']} tokens, stride {p['stride']})")

    results["ft_prog_config"] = resolved or to_dict(cfg)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    with atomic_folder(out) as folder:  # with overwrite, the old folder goes once the new one is whole
        (folder / "eval_results.json").write_text(text, encoding="utf-8")
        for task, rows in samples.items():
            (folder / f"samples_{task}.jsonl").write_text(
                "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    print(f"results: {out / 'eval_results.json'}")
    return json.loads(text)
