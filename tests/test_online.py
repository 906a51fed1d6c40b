"""Online DPO (trainers/online.py) with a tiny policy and a tiny reward model saved here: an online step equals an
offline DPO step on the pairs it sampled and wrote, a resumed run samples and trains exactly as an uninterrupted one,
LoRA generates through its adapter, ties are dropped and counted, and the config refusals name what to change.
OPTune's utility weighting (losses/optune.py): weights and gradients by hand, the reward columns of a pairs file
through the data pipeline, and online pairs weighted by it. The vLLM backend (trainers/vllm_sync.py): the pushed
weights equal the merged export's (LoRA) or the state dict, and with a stub engine in place of vllm.LLM a run pushes
before every sampling and samples and trains as the transformers backend does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from tests.conftest import ROOT, make_cfg, read_metrics, two_process_launch
from tests.test_preference_losses import SEQS, make_out, pairs
from tunelab.data.collate import Collator
from tunelab.data.onpolicy import ALL_TIED, pair_row, read_jsonl
from tunelab.data.pipeline import build_datasets
from tunelab.losses import build_loss
from tunelab.losses.optune import OPTuneWeighting
from tunelab.trainers.config_check import ConfigError, check_config
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.export import export_model
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.generation import SamplingSettings, TransformersBackend
from tunelab.trainers.models import DTYPES, build_model, build_tokenizer, tiny_tokenizer
from tunelab.trainers.online import step_seed
from tunelab.trainers.trainer import Trainer
from tunelab.trainers.vllm_sync import policy_weights

# constant lr without warmup: the first step moves the weights, and a resume with another max_steps keeps the lr
COMMON = ["recipe=dpo", "reference.strategy=frozen_copy", "train.scheduler=constant", "train.warmup_ratio=0",
          "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_at_start=false", "train.eval_every=0",
          "export.enabled=false", "train.log_every=1", "online.max_new_tokens=8", "train.lr=1e-3"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A random-init one-label sequence classifier on the tiny tokenizer: its scores differ between texts, which is
    all labelling needs."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, num_labels=1)
    path = tmp_path_factory.mktemp("rm") / "reward_model"
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def online_cfg(reward_model: str, out, *extra):
    return make_cfg([*COMMON, "online.enabled=true", f"online.reward_model={reward_model}", f"output_dir={out}",
                     "data.sources.0.num_rows=24", *extra])


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.policy).model
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", [[], ["~loss.dpo", "+loss.simpo={beta: 2.0, gamma_beta_ratio: 0.25}"]],
                         ids=["dpo", "simpo"])
def test_an_online_step_equals_an_offline_step_on_the_pairs_it_wrote(reward_model, tmp_path, loss):
    # plain SGD: the update is lr x gradient, so equal weights mean equal gradients (Adam's first step, g / (|g| +
    # eps), would magnify float rounding of the gradients that are near eps)
    sgd = ["train.optimizer=sgd", "train.lr=0.5", *loss]
    online = Trainer(online_cfg(reward_model, tmp_path / "online", *sgd))
    before = weights(online)
    stepped = online.train_step()
    after = weights(online)
    pairs, torn = read_jsonl(str(tmp_path / "online" / "online" / "step_1.jsonl"))
    assert not torn and len(pairs) >= 2
    for pair in pairs:  # the chosen response is the better-rewarded one, and the rewards travel with the pair
        assert pair["chosen_reward"] > pair["rejected_reward"]
        assert pair["chosen"][:-1] == pair["rejected"][:-1] and pair["chosen"][-1]["role"] == "assistant"
    reset_accelerate()
    # the same init (same seed), one step on the written file with the whole file as the global batch
    offline = Trainer(make_cfg([*COMMON, f"output_dir={tmp_path / 'offline'}",
                                f"data.path={tmp_path / 'online' / 'online' / 'step_1.jsonl'}",
                                "data.format=pairwise_messages", "data.eval_fraction=0",
                                f"train.global_batch_size={len(pairs)}", f"train.micro_batch_size={len(pairs)}", *sgd],
                               fast=False))
    assert all(torch.equal(before[name], w) for name, w in weights(offline).items())
    replayed = offline.train_step()
    assert replayed.loss == pytest.approx(stepped.loss, abs=1e-6)
    moved = weights(offline)
    assert max(float((after[n] - before[n]).abs().max()) for n in after) > 1e-3  # the step did move the weights
    assert max(float((moved[n] - after[n]).abs().max()) for n in after) < 1e-6


@pytest.mark.slow
def test_a_resumed_run_samples_and_trains_as_the_uninterrupted_one(reward_model, tmp_path):
    whole = tmp_path / "whole"
    Trainer(online_cfg(reward_model, whole, "train.max_steps=3")).fit()
    reset_accelerate()
    part = tmp_path / "part"
    Trainer(online_cfg(reward_model, part, "train.max_steps=2", "train.save_every=1")).fit()
    reset_accelerate()
    Trainer(online_cfg(reward_model, part, "train.max_steps=3", "resume=latest")).fit()
    assert [m["loss"] for m in read_metrics(str(part))] == pytest.approx(
        [m["loss"] for m in read_metrics(str(whole))], abs=1e-6)
    for step in (1, 2, 3):
        name = os.path.join("online", f"step_{step}.jsonl")
        assert read_jsonl(str(part / name)) == read_jsonl(str(whole / name))
    third = read_jsonl(str(whole / "online" / "step_3.jsonl"))[0]
    assert third != read_jsonl(str(whole / "online" / "step_2.jsonl"))[0]  # each step samples anew
    assert step_seed(42, 2) != step_seed(42, 1) and step_seed(42, 2) != step_seed(43, 2)


@pytest.mark.slow
def test_lora_generates_through_its_adapter(reward_model, tmp_path):
    cfg = online_cfg(reward_model, tmp_path / "lora", "model.lora.enabled=true", "reference.strategy=auto",
                     "train.lr=2e-2", "train.max_steps=2")
    trainer = Trainer(cfg)
    first = trainer.train_step()
    # the adapter starts at zero, so the policy is its reference: DPO's first loss is exactly log 2
    assert first.loss == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
    model = trainer.accelerator.unwrap_model(trainer.policy).model
    prompts = [(0, json.loads(trainer.train_ds[0]["turns"]))]
    with_adapter, _ = trainer.batch_source.pairs(5, prompts, model)
    with model.disable_adapter():
        without, _ = trainer.batch_source.pairs(5, prompts, model)
    assert with_adapter and without and with_adapter[0]["chosen"] != without[0]["chosen"]
    second = trainer.train_step()
    assert second.loss != pytest.approx(first.loss, abs=1e-4)


def test_tied_samples_give_no_pair_and_are_counted(reward_model, tmp_path, monkeypatch):
    trainer = Trainer(online_cfg(reward_model, tmp_path / "ties"))
    scorer = trainer.batch_source.scorer
    monkeypatch.setattr(scorer, "score", lambda prompts, responses: [1.0] * 2 + [float(i) for i in
                                                                               range(len(responses) - 2)])
    batches = trainer._step_batches(0)
    assert sum(b.counts["pairs"] for b in batches) == 3  # four prompts, the first one's samples tied
    assert trainer.batch_source.metrics["online/tie_rate"].value == 1.0
    summary = json.loads((tmp_path / "ties" / "online" / "steps.jsonl").read_text().splitlines()[-1])
    assert summary["dropped"] == {ALL_TIED: 1} and summary["pairs"] == 3


@pytest.mark.slow
def test_two_processes_sample_for_their_own_prompts_and_step_as_one(reward_model, tmp_path):
    """Each rank generates for its own micro-batches; the samples of a prompt depend on its index, not on the rank
    that draws it, so the two ranks' files hold the one-process run's pairs and the step's loss is the same."""
    args = [*COMMON, "online.enabled=true", f"online.reward_model={reward_model}", "data.sources.0.num_rows=24",
            "train.max_steps=1", "train.progress_bar=false", "train.plot=false"]
    launched = subprocess.run([*two_process_launch(), *args, f"output_dir={tmp_path / 'ddp'}"], cwd=ROOT, timeout=600,
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = Trainer(online_cfg(reward_model, tmp_path / "one", "train.max_steps=1")).fit()
    ranks = {row["index"]: row for r in (0, 1)
             for row in read_jsonl(str(tmp_path / "ddp" / "online" / f"step_1.jsonl.rank{r}-of-2"))[0]}
    one = {row["index"]: row for row in read_jsonl(str(tmp_path / "one" / "online" / "step_1.jsonl"))[0]}
    assert sorted(ranks) == sorted(one)
    for index, row in one.items():  # the same texts; the reward model's scores up to padding's rounding
        assert (ranks[index]["chosen"], ranks[index]["rejected"]) == (row["chosen"], row["rejected"])
        assert ranks[index]["rejected_reward"] == pytest.approx(row["rejected_reward"], abs=1e-5)
    assert read_metrics(str(tmp_path / "ddp"))[0]["loss"] == pytest.approx(single["train_last"]["loss"], abs=1e-6)


@pytest.mark.slow
def test_the_shipped_recipe_runs_with_a_reward_model_trained_by_recipe_reward(tmp_path):
    Trainer(make_cfg(["recipe=reward", f"output_dir={tmp_path / 'rm'}", "train.max_steps=2", "train.eval_every=0",
                      "train.eval_at_start=false"])).fit()
    reset_accelerate()
    check_config(make_cfg(["recipe=online_dpo"], fast=False))  # a shipped recipe passes; the run start refuses it
    with pytest.raises(ValueError, match="needs online.reward_model"):
        Trainer(make_cfg(["recipe=online_dpo", f"output_dir={tmp_path / 'refused'}"], fast=False))
    reset_accelerate()
    summary = Trainer(make_cfg(["recipe=online_dpo", f"online.reward_model={tmp_path / 'rm' / 'export'}",
                                f"output_dir={tmp_path / 'online'}", "train.max_steps=2", "train.progress_bar=false",
                                "train.plot=false", "export.enabled=false"], fast=False)).fit()
    assert summary["steps"] == 2
    logged = read_metrics(summary["output_dir"])
    assert len(logged) == 2 and all(0 < m["online/pair_rate"] <= 1 and "online/reward_mean" in m for m in logged)


@pytest.mark.parametrize("overrides, message", [
    (["reference.strategy=precomputed"], "precomputed log-probs exist only for examples known before training"),
    (["reference.strategy=auto"], "reference.strategy=auto (precomputed without LoRA)"),
    (["~loss.dpo", "+loss.ntp={}"], "the loss must be pairwise"),
    (["online.samples_per_prompt=1"], "online.samples_per_prompt=1 is invalid"),
])
def test_config_refusals_name_the_key(reward_model, tmp_path, overrides, message):
    cfg = online_cfg(reward_model, tmp_path / "bad", *overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(cfg)


# ---- OPTune's utility weighting (losses/optune.py) --------------------------------------------------------------
def with_rewards(chosen: list[float], rejected: list[float]):
    """make_out's two pairs with the reward columns on both sequences of each pair, as the collator carries them."""
    out = make_out()
    out.seq_columns = {"chosen_reward": torch.tensor([v for v in chosen for _ in (0, 1)], dtype=torch.float32),
                       "rejected_reward": torch.tensor([v for v in rejected for _ in (0, 1)], dtype=torch.float32)}
    return out


@pytest.mark.parametrize("form, temperature, expected", [
    ("margin", 1.0, [2 / (1 + math.exp(-1.5)) - 1, 0.0]),  # gaps 1.5 and -0.5: a disagreeing label weighs 0
    ("margin", 0.5, [2 / (1 + math.exp(-3.0)) - 1, 0.0]),
    ("probability", 1.0, [1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(0.5))]),
    ("linear", 0.5, [3.0, 0.0]),
])
def test_optune_weights_by_hand(form, temperature, expected):
    weights, metrics = OPTuneWeighting(form, temperature)(with_rewards([2.0, 0.25], [0.5, 0.75]))
    assert weights.tolist() == pytest.approx(expected, abs=1e-7)
    assert float(metrics["optune/gap_mean"].value) / metrics["optune/gap_mean"].count == pytest.approx(0.5)
    assert float(metrics["optune/weight_max"].value) == pytest.approx(max(expected), abs=1e-7)


def test_optune_scales_each_pairs_dpo_gradient_by_its_weight():
    beta = 0.1
    rewards = ([2.0, 1.0], [0.5, 0.0])
    weights = [2 / (1 + math.exp(-gap)) - 1 for gap in (1.5, 1.0)]
    out = with_rewards(*rewards)
    sums, metrics = build_loss({"dpo": {"beta": beta}}, {"name": "optune"})(out)
    sums["pairs"].backward()
    grad = out.token_logps.grad
    # d/d logp of w * -log sigmoid(beta * z): -w * beta * sigmoid(-beta * z) on each chosen token, + on rejected ones
    starts = [0, 3, 5, 7]
    for i, (c, r, _, _, rc, rr) in enumerate(pairs()):
        slope = weights[i] * beta / (1 + math.exp(beta * ((c - rc) - (r - rr))))
        chosen, rejected = range(starts[2 * i], starts[2 * i] + len(SEQS[2 * i])), \
            range(starts[2 * i + 1], starts[2 * i + 1] + len(SEQS[2 * i + 1]))
        assert [float(grad[t]) for t in chosen] == pytest.approx([-slope] * len(chosen), abs=1e-12)
        assert [float(grad[t]) for t in rejected] == pytest.approx([slope] * len(rejected), abs=1e-12)
    assert "optune/weight_mean" in metrics


def test_optune_refuses_pairs_without_rewards_and_bad_options():
    with pytest.raises(ValueError, match="2 of 2 pairs in the batch lack 'chosen_reward'"):
        OPTuneWeighting()(with_rewards([math.nan, math.nan], [0.0, 0.0]))
    with pytest.raises(ValueError, match="unknown optune form"):
        OPTuneWeighting("cubic")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        OPTuneWeighting(temperature=0)


def test_a_pairs_files_reward_columns_reach_the_weighting_through_the_pipeline(tmp_path):
    turns = [{"role": "user", "content": "Name a colour."}]
    with_scores = tmp_path / "scored.jsonl"
    rows = [{**pair_row(turns, f"Blue {i}.", f"No {i}.", 1.0 + i, -1.0), "chosen_reward": 1.0 + i,
             "rejected_reward": -1.0} for i in range(3)]
    with_scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    without = tmp_path / "plain.jsonl"
    without.write_text(json.dumps({"prompt": "Why?", "chosen": "Because.", "rejected": "No."}) + "\n")
    cfg = make_cfg(["recipe=dpo", "+pair_weighting={name: optune}", "data.eval_fraction=0",
                    f"data.sources=[{{path: {with_scores}, format: pairwise_messages}}, "
                    f"{{path: {without}, format: pairwise_strings}}]"], fast=False)
    tokenizer = build_tokenizer(cfg.model)
    columns = build_loss(cfg.loss, cfg.pair_weighting).needs.columns
    train, _, _ = build_datasets(cfg.data, tokenizer, "pairs", cfg.seed, columns=columns)
    assert train["chosen_reward"][:3] == [1.0, 2.0, 3.0] and math.isnan(train["chosen_reward"][3])
    batch = Collator("pairs", True, True, 256, columns=sorted(columns))([train[i] for i in range(3)])
    assert batch.seq_columns["chosen_reward"].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_online_pairs_compose_with_the_optune_weighting(reward_model, tmp_path):
    trainer = Trainer(online_cfg(reward_model, tmp_path / "optune", "+pair_weighting={name: optune}"))
    result = trainer.train_step()
    pairs_written, _ = read_jsonl(str(tmp_path / "optune" / "online" / "step_1.jsonl"))
    expected = [2 / (1 + math.exp(-(p["chosen_reward"] - p["rejected_reward"]))) - 1 for p in pairs_written]
    logged = result.metrics.reduce(trainer.accelerator)
    assert logged["optune/weight_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


# ---- online.backend=vllm: the colocated engine and its weight sync (trainers/vllm_sync.py) ------------------------
ENGINE_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def lora_model_with_trained_adapter():
    """The tiny policy with LoRA on every linear layer, its adapters drawn at random (a fresh adapter's B is zero,
    which would make the merge the identity)."""
    cfg = make_cfg(["model.lora.enabled=true"])
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    draws = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=draws) * 0.1)
    return model, tokenizer


def test_policy_weights_of_a_lora_policy_are_the_merged_exports_state_dict(tmp_path):
    model, tokenizer = lora_model_with_trained_adapter()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pushed = {name: tensor.clone() for name, tensor in policy_weights(model)}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)  # bit-identical
    # the independent merge: peft's merge_and_unload in our export, written and read back by transformers
    export_model(Accelerator(cpu=True), CausalLMWithLogProbs(model), tokenizer, str(tmp_path), merge_lora=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").state_dict()
    assert sorted(pushed) == sorted(exported)
    assert "model.layers.0.self_attn.q_proj.weight" in pushed and not any("lora" in n for n in pushed)
    for name, tensor in exported.items():
        assert torch.allclose(pushed[name], tensor, atol=1e-6, rtol=0), name
    base = before["base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"]
    assert float((pushed["model.layers.0.mlp.down_proj.weight"] - base).abs().max()) > 1e-2  # the adapter counted


def test_policy_weights_of_a_full_policy_are_its_state_dict():
    cfg = make_cfg([])
    model = build_model(cfg.model, build_tokenizer(cfg.model), cfg.seed)
    pushed = dict(policy_weights(model))
    state = model.state_dict()
    assert list(pushed) == list(state) and all(torch.equal(pushed[n], state[n]) for n in state)


class StubLLM:
    """The surface of vllm.LLM that the colocated engine uses, over a transformers model built from the directory
    the engine writes (dummy weights: random until pushed). ``load_weights`` takes a pushed (name, tensor) only
    under a name and shape of that model's state dict; generation refuses to run unless every tensor was pushed
    since the previous one, then samples with TransformersBackend and the requests' own seeds."""

    built: list[StubLLM] = []

    def __init__(self, model, dtype, max_model_len, seed, distributed_executor_backend, gpu_memory_utilization,
                 load_format):
        assert (load_format, distributed_executor_backend) == ("dummy", "external_launcher")
        assert gpu_memory_utilization == 0.3 and all(key in os.environ for key in ENGINE_ENV)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=DTYPES[dtype]).eval()
        self.state = self.net.state_dict()
        self.pushed: set[str] = set()
        self.events: list[str] = []
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=runner)))
        StubLLM.built.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def load_weights(self, weights):
        for name, tensor in weights:
            assert name in self.state and tensor.shape == self.state[name].shape, name
            with torch.no_grad():
                self.state[name].copy_(tensor)
            self.pushed.add(name)

    def reset_prefix_cache(self):
        self.events.append("push" if self.pushed == set(self.state) else f"partial push of {len(self.pushed)}")
        self.pushed = set()

    def generate(self, requests, params, use_tqdm):
        assert self.events and self.events[-1] == "push", self.events  # every weight pushed since the last sampling
        self.events.append("generate")
        first = params[0]
        settings = SamplingSettings(temperature=first.temperature, top_p=first.top_p, max_new_tokens=first.max_tokens)
        texts = [self.tokenizer.decode(r["prompt_token_ids"]) for r in requests]
        sampled = TransformersBackend(self.net, self.tokenizer, len(texts))._batch(texts, [p.seed for p in params],
                                                                                     settings)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                                                         token_ids=tokens,
                                                         finish_reason="stop" if reason == "eos" else "length")])
                for tokens, reason in sampled]


@pytest.fixture
def stub_vllm(monkeypatch):
    """StubLLM in place of vllm.LLM (a fake ``vllm`` package), the CUDA check passed, and the launcher's
    environment variables, which the engine sets, restored afterwards."""
    fake, inputs = ModuleType("vllm"), ModuleType("vllm.inputs")
    fake.LLM, fake.SamplingParams, inputs.TokensPrompt = StubLLM, SimpleNamespace, dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr("tunelab.trainers.config_check.vllm_problem", lambda: None)
    for key in ENGINE_ENV:  # recorded as they are now, so that teardown restores them
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    StubLLM.built = []
    return StubLLM


@pytest.mark.parametrize("lora", [[], pytest.param(["model.lora.enabled=true", "reference.strategy=auto",
                                                   "train.lr=2e-2"], marks=pytest.mark.slow)], ids=["full", "lora"])
def test_the_vllm_backend_with_its_sync_samples_and_trains_as_the_transformers_one(reward_model, tmp_path,
                                                                                      stub_vllm, lora):
    steps = ["train.max_steps=3", *lora]
    Trainer(online_cfg(reward_model, tmp_path / "hf", *steps)).fit()
    reset_accelerate()
    vllm = ["online.backend=vllm", "online.vllm_dtype=float32"]
    Trainer(online_cfg(reward_model, tmp_path / "vllm", *steps, *vllm)).fit()
    (engine,) = stub_vllm.built  # one engine, built once
    assert engine.events == ["push", "generate"] * 3
    for step in (1, 2, 3):
        name = os.path.join("online", f"step_{step}.jsonl")
        assert read_jsonl(str(tmp_path / "vllm" / name)) == read_jsonl(str(tmp_path / "hf" / name))
    assert [m["loss"] for m in read_metrics(str(tmp_path / "vllm"))] == pytest.approx(
        [m["loss"] for m in read_metrics(str(tmp_path / "hf"))], abs=1e-6)
    assert all(m["online/sync_s"] > 0 for m in read_metrics(str(tmp_path / "vllm")))
    summaries = read_jsonl(str(tmp_path / "vllm" / "online" / "steps.jsonl"))[0]
    assert [s["step"] for s in summaries] == [1, 2, 3] and all(s["sync_s"] > 0 for s in summaries)


def test_the_vllm_backend_is_refused_without_cuda_naming_the_key(reward_model, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="online.backend=vllm needs a CUDA GPU"):
        check_config(online_cfg(reward_model, tmp_path / "bad", "online.backend=vllm"))
