"""`ft-prog run eval`: ft-prog's lm-eval model against lm-eval's own Hugging Face backend on local tasks
(multiple choice, generate_until, loglikelihood with an empty context, rolling perplexity), the
perplexity path against transformers, errors and the CLI."""

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from _hf import hf_model
from _tokfixtures import CORPUS, build_bpe_folder, build_sentencepiece_folder
from ftprog.core import load_pretrained, load_tokenizer, perplexity, perplexity_windows
from ftprog.programs.cli import app
from ftprog.programs.evaluate import EvalConfig, FtProgLM, run, task_manager
from ftprog.programs.sft_config import ModelSection

import transformers
import lm_eval

MAX_LENGTH = 48
TASKS = ["ftp_mc", "ftp_gen", "ftp_ll", "ftp_ppl"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Four local lm-eval tasks over JSONL files."""
    folder = tmp_path_factory.mktemp("tasks")
    words = " ".join(CORPUS).split()
    mc = [{"question": " ".join(words[i : i + 5]), "answer": i % 3,
           "choices": [words[i + 5], words[i + 6], " ".join(words[i + 7 : i + 9])]} for i in range(0, 60, 6)]
    write_jsonl(folder / "mc.jsonl", mc)
    write_jsonl(folder / "gen.jsonl", [{"question": " ".join(words[i : i + 4]), "answer": words[i + 4]}
                                       for i in range(0, 40, 5)])
    write_jsonl(folder / "text.jsonl", [{"text": CORPUS[i] + " " + CORPUS[i + 1]} for i in range(0, 12, 2)])
    write_jsonl(folder / "short.jsonl", [{"text": " ".join(words[i : i + 3])} for i in range(0, 30, 5)])
    data = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {folder / name}\n" \
                        f"    test: {folder / name}\ntraining_split: train\ntest_split: test\n"  # noqa: E731
    (folder / "ftp_mc.yaml").write_text(
        "task: ftp_mc\n" + data("mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "ftp_gen.yaml").write_text(
        "task: ftp_gen\n" + data("gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 10\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (folder / "ftp_ll.yaml").write_text(
        "task: ftp_ll\n" + data("short.jsonl") + "output_type: loglikelihood\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    (folder / "ftp_ppl.yaml").write_text(
        "task: ftp_ppl\n" + data("text.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return folder


def make_model_folder(folder, tokenizer):
    """A random transformers model saved with a tokenizer: BPE (no BOS) or sentencepiece (adds BOS).

    Not Qwen2 for BPE: transformers 5 loads a qwen2 folder's tokenizer with Qwen2's pre-tokenizer regex,
    whatever tokenizer.json says (real Qwen2 files have that regex anyway; this fixture's do not).
    """
    if tokenizer == "bpe":
        hf_model("qwen3", vocab_size=600, max_position_embeddings=256).save_pretrained(folder)
        build_bpe_folder(folder)  # after the model: its generation_config.json names the stop ids
    else:
        hf_model("llama2", vocab_size=700, max_position_embeddings=256).save_pretrained(folder)
        build_sentencepiece_folder(folder)
    return folder


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def model_folder(request, tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp(request.param), request.param)


def by_doc(samples):
    return {s["doc_id"]: s for s in samples}


def test_scores_equal_lm_eval_hf_backend(model_folder, task_dir):
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(str(task_dir))
    common = dict(tasks=TASKS, num_fewshot=1, task_manager=manager, log_samples=True, random_seed=0,
                  bootstrap_iters=0)
    hf = HFLM(pretrained=str(model_folder), dtype="float32", device="cpu", batch_size=3, max_length=MAX_LENGTH)
    ref = lm_eval.simple_evaluate(model=hf, **common)
    ours_lm = FtProgLM(load_pretrained(model_folder), load_tokenizer(model_folder), batch_size=4,
                       max_length=MAX_LENGTH)
    ours = lm_eval.simple_evaluate(model=ours_lm, **common)

    worst = 0.0
    for task in TASKS:
        ref_samples, our_samples = by_doc(ref["samples"][task]), by_doc(ours["samples"][task])
        assert ref_samples.keys() == our_samples.keys() and len(ref_samples) >= 6
        for doc_id, r in ref_samples.items():
            o = our_samples[doc_id]
            assert o["arguments"] == r["arguments"]  # the same prompts reached both models
            for ours_resp, ref_resp in zip(o["resps"], r["resps"], strict=True):
                ours_resp, ref_resp = ours_resp[0], ref_resp[0]
                if isinstance(ref_resp, str):
                    assert ours_resp == ref_resp, (task, doc_id)
                elif isinstance(ref_resp, float):  # rolling log-likelihood
                    worst = max(worst, abs(ours_resp - ref_resp))
                else:  # (log-likelihood, is_greedy)
                    worst = max(worst, abs(ours_resp[0] - ref_resp[0]))
                    assert ours_resp[1] == ref_resp[1], (task, doc_id)
        for metric, value in ref["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)
    print(f"max |log-likelihood difference| vs HFLM: {worst:.2e}")
    assert worst < 1e-4
    # The generation task produced text (not only empty strings) and the rolling task spans several windows.
    assert any(s["resps"][0][0] for s in ours["samples"]["ftp_gen"])
    docs = [s["doc"]["text"] for s in ours["samples"]["ftp_ppl"]]
    assert max(len(ours_lm.tok_encode(d)) for d in docs) > MAX_LENGTH


def test_special_tokens_as_hflm(model_folder):
    """tok_encode, prefix token and context/continuation splits match HFLM's."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(model_folder), dtype="float32", device="cpu", max_length=MAX_LENGTH)
    for add_bos in (None, True, False):
        hf_lm = HFLM(pretrained=hf.model, tokenizer=transformers.AutoTokenizer.from_pretrained(
            model_folder, **({} if add_bos is None else {"add_bos_token": add_bos})), add_bos_token=add_bos)
        ours = FtProgLM(load_pretrained(model_folder), load_tokenizer(model_folder), add_bos_token=add_bos)
        assert ours.prefix_token_id == hf_lm.prefix_token_id and ours.eot_token_id == hf_lm.eot_token_id
        bos_text = hf_lm.tokenizer.decode(hf_lm.prefix_token_id)
        for text in ["Hello, world!", " leading space", bos_text + "Hello", "Question: what?\nAnswer:"]:
            for special in (None, True, False):
                assert ours.tok_encode(text, special) == hf_lm.tok_encode(text, special), (add_bos, text, special)
            assert ours._encode_context(text) == hf_lm.tok_batch_encode([text])[0][0].tolist()
        for context, continuation in [("The quick brown", " fox"), ("Answer: ", "Paris"), ("a b", " c d e")]:
            assert ours._encode_pair(context, continuation) == hf_lm._encode_pair(context, continuation)


def test_adapter_and_quantized_models(tmp_path):
    """With a PEFT adapter: the same scores as HFLM(peft=...); quantized (int8): close to the fp32 scores."""
    import peft
    from lm_eval.models.huggingface import HFLM

    from ftprog.transforms import load_adapter, quantize

    folder = make_model_folder(tmp_path / "m", "sentencepiece")
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    hf = HFLM(pretrained=str(folder), peft=str(tmp_path / "adapter"), dtype="float32", device="cpu", batch_size=2,
              max_length=MAX_LENGTH)
    base, tokenizer = load_pretrained(folder), load_tokenizer(folder)
    ours = FtProgLM(load_adapter(base, tmp_path / "adapter"), tokenizer, batch_size=3, max_length=MAX_LENGTH)
    pairs = [("The quick brown", " fox jumps"), ("Hello, world!", " Hello there"), (CORPUS[3], " " + CORPUS[4])]
    requests = [(pair, *hf._encode_pair(*pair)) for pair in pairs]
    expected = hf._loglikelihood_tokens(requests, disable_tqdm=True)
    got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert max(abs(g[0] - e[0]) for g, e in zip(got, expected)) < 1e-4
    plain = FtProgLM(base, tokenizer, max_length=MAX_LENGTH)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert max(abs(g[0] - p[0]) for g, p in zip(got, plain)) > 1e-2  # the adapter changes the scores
    int8 = FtProgLM(quantize(base, "int8"), tokenizer, max_length=MAX_LENGTH)._loglikelihood_tokens(requests)
    assert all(abs(q[0] - p[0]) < 0.02 * abs(p[0]) for q, p in zip(int8, plain))


def test_perplexity_equals_transformers(tmp_path):
    folder = make_model_folder(tmp_path / "m", "sentencepiece")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    docs = [" ".join(CORPUS[:5]), CORPUS[5], "Hi"]
    max_length, stride = 16, 5
    # The reference: each token j >= 1 scored once, by the first window that reaches it, with all that window's context.
    nll, count = 0.0, 0
    for ids in (tokenizer(d)["input_ids"] for d in docs):
        scored_to = 1
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            with torch.no_grad():
                logprobs = hf(torch.tensor([ids[begin:end]])).logits[0].log_softmax(-1)
            for j in range(scored_to, end):
                nll -= logprobs[j - 1 - begin, ids[j]].item()
                count += 1
            scored_to = end
            if end == len(ids):
                break
    ours = perplexity(load_pretrained(folder), [tokenizer(d)["input_ids"] for d in docs], max_length=max_length,
                      stride=stride, batch_size=3)
    assert ours["tokens"] == count == sum(len(tokenizer(d)["input_ids"]) - 1 for d in docs)
    assert ours["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # Windows: every token but the first scored exactly once, each with >= max_length - stride tokens of context.
    ids = list(range(40))
    scored = [j for tokens, targets in perplexity_windows(ids, 10, 3) for j in targets if j != -100]
    assert scored == ids[1:]
    with pytest.raises(ValueError, match="stride"):
        perplexity(load_pretrained(folder), [ids], max_length=10, stride=10)


def test_unknown_task_lists_close_matches(task_dir, tmp_path):
    folder = make_model_folder(tmp_path / "m", "bpe")
    cfg = EvalConfig(model=ModelSection(path=str(folder)), tasks=["ftp_mcc"], include_path=str(task_dir))
    with pytest.raises(ValueError, match="unknown lm-eval task 'ftp_mcc'; did you mean 'ftp_mc'"):
        run(cfg)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run(EvalConfig(model=ModelSection(path=str(folder))))


def test_cli_writes_eval_results(task_dir, tmp_path):
    folder = make_model_folder(tmp_path / "m", "bpe")
    (tmp_path / "text.txt").write_text(" ".join(CORPUS))
    tasks = tmp_path / "tasks"  # task_dir's tasks, and one running Python from the folder (lm-eval's !function)
    shutil.copytree(task_dir, tasks)
    (tasks / "ftp_fn.yaml").write_text((task_dir / "ftp_mc.yaml").read_text().replace("task: ftp_mc", "task: ftp_fn")
                                       + "process_docs: !function helpers.first_docs\n")
    (tasks / "helpers.py").write_text("def first_docs(dataset):\n    return dataset.select(range(4))\n")
    out = tmp_path / "out"
    config = tmp_path / "eval.toml"
    config.write_text(f'tasks = ["ftp_mc", "ftp_ppl", "ftp_fn"]\ninclude_path = "{tasks}"\nlimit = 4\n'
                      f'max_length = 32\ndtype = "fp32"\nperplexity_file = "{tmp_path / "text.txt"}"\n'
                      f'output_dir = "{out}"\nlog_samples = true\n[model]\npath = "{folder}"\n')
    result = CliRunner().invoke(app, ["run", "eval", "--config", str(config), "batch_size=2"])
    assert result.exit_code == 0, result.output
    notice = f"note: task {tasks / 'ftp_fn.yaml'} runs Python code from {tasks / 'helpers.py'} (lm-eval's !function)"
    assert result.output.count("runs Python code") == 1 and notice in result.output, result.output
    assert "ftp_mc" in result.output and "acc" in result.output and "perplexity of" in result.output
    assert "ftp_fn" in json.loads((out / "eval_results.json").read_text())["results"]
    again = CliRunner().invoke(app, ["run", "eval", "--config", str(config)])  # never replaced unasked
    assert again.exit_code == 1 and f"the output {out} already exists" in again.stderr
    assert "overwrite=true" in again.stderr
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 <= results["results"]["ftp_mc"]["acc,none"] <= 1
    assert results["results"]["ftp_ppl"]["word_perplexity,none"] > 1
    assert results["perplexity"]["tokens"] > 100 and results["perplexity"]["perplexity"] > 1
    assert len((out / "samples_ftp_mc.jsonl").read_text().splitlines()) == 4
