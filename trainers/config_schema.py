"""The run config's typed structure: every key of the model, train, reference and export blocks with its type,
its default (defined here only) and a one-line description; `compose_config` composes recipes/config.yaml on it.

`register()` stores the structure in Hydra's ConfigStore as `base_schema`, the first entry of recipes/config.yaml's
defaults list: train.py calls it before Hydra composes, and every other composer goes through `compose_config`.

Types are checked by OmegaConf while the config composes (a wrong type or an unknown key fails naming the key);
the value rules (ranges, choices, cross-key checks) are trainers/config_check.py's, the one validation path for
values. The `data` block, the `loss` terms and `pair_weighting` stay free dicts: their keys depend on the chosen
sources, stages and losses, and the data pipeline and each loss's constructor reject options they do not take
(docs/config.md lists every loss's options). A key that is null or a mapping is typed Any, as OmegaConf cannot
merge a command-line mapping into a null typed as an optional dict. `config_docs()` writes docs/config.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def option(default: Any, description: str) -> Any:
    """A field with its default and its one-line description (the source of any number in it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": description})
    return field(default=default, metadata={"help": description})


def block(kind: type, description: str) -> Any:
    return field(default_factory=kind, metadata={"help": description})


@dataclass
class LoraConfig:
    enabled: bool = option(False, "train a LoRA adapter (peft) instead of all weights")
    r: int = option(16, "adapter rank; 16 with alpha 32 is the common peft setting, model configs override it")
    alpha: int = option(32, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = option(0.05, "dropout on the adapter input (peft's usual 0.05)")
    target_modules: Any = option("all-linear", "all-linear or a list of module names to adapt")


@dataclass
class RecommendedConfig:
    """Set by each model config, with its sources; `???` (missing) here, so a model config without them fails."""

    sft_lr: float = option(MISSING, "learning rate the generic SFT recipes take")
    preference_lr: float = option(MISSING, "learning rate the generic preference recipes take")
    lr_range: list[float] = option(MISSING, "[low, high]: an lr outside it is noted at start-up (config_check)")
    lora_lr_range: list[float] = option(MISSING, "[low, high]: the same for LoRA runs")
    sft_micro_batch_size: int = option(MISSING, "micro-batch the generic SFT recipes take")
    preference_micro_batch_size: int = option(MISSING, "micro-batch the generic preference recipes take")


@dataclass
class TinyConfig:
    hidden_size: int = option(128, "width of the random-init test Llama")
    num_layers: int = option(2, "decoder layers")
    num_heads: int = option(4, "attention heads")
    num_kv_heads: int | None = option(None, "null = num_heads (no grouped-query attention)")
    intermediate_size: int = option(344, "MLP width")
    max_position_embeddings: int = option(1024, "longest sequence")
    tie_word_embeddings: bool = option(True, "share input and output embeddings")


@dataclass
class ModelConfig:
    source: str = option("tiny", "tiny (random-init, built in code) | hf (any causal LM) | gguf (a .gguf file)")
    name_or_path: str | None = option(None, "hub id or local directory (source hf)")
    gguf_file: str | None = option(None, "<package>:<file> or a path to a .gguf (source gguf)")
    tokenizer: str | None = option(None, "null: the model's own (tiny: the shipped tiny tokenizer)")
    trust_remote_code: bool = option(False, "let transformers run the model repository's code")
    dtype: str = option("float32", "compute precision the weights load in (float32 | bfloat16 | float16)")
    master_weights: str = option("fp32", "fp32: trainable weights kept in float32; none: in model.dtype with "
                                 "Kahan-summation updates (bfloat16 only). docs/distributed.md, Precision")
    attn_implementation: str = option("tiled_sdpa", "tiled_sdpa | flex (CUDA for training) | flash_attention_2 "
                                      "(CUDA, flash-attn; no shared-prompt layouts) | sdpa | eager: those that "
                                      "take the packed layout's ids (trainers/attention.py)")
    liger: bool = option(False, "Liger's Triton kernels for RMSNorm, RoPE and SwiGLU, not its losses (CUDA; "
                         "trainers/liger.py; Hsu et al. 2024, arXiv 2410.10989)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    load_in_4bit: bool = option(False, "QLoRA: 4-bit base weights (bitsandbytes, GPU) with lora.enabled=true")
    recommended: RecommendedConfig = block(RecommendedConfig, "what depends on the model; set by each model config")
    tiny: TinyConfig | None = option(None, "source tiny: the random-init model's shape (recipes/model/tiny.yaml)")
    lora: LoraConfig = block(LoraConfig, "LoRA settings, defined here once; model configs override what differs")


@dataclass
class ReferenceConfig:
    strategy: str = option("auto", "auto (adapter_disabled for LoRA, else precomputed) | precomputed | frozen_copy "
                           "| adapter_disabled: how reference log-probs are obtained (trainers/reference.py)")
    update_every: int = option(0, "TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): steps between reference "
                               "updates toward the policy; 0 keeps it fixed; TRL's default tau is 512")
    update_alpha: float = option(0.6, "TR-DPO mixing weight, ref <- a*policy + (1-a)*ref (TRL's default 0.6)")
    cache_dir: str = option("${oc.env:TUNELAB_CACHE,${oc.env:HOME}/.cache/tunelab}/ref_logps",
                            "where precomputed reference log-probs are cached per example")
    model_path: str | None = option(None, "a Hugging Face model directory (or hub id) the reference is loaded from "
                                    "instead of the policy's initial weights (same tokenizer); frozen_copy only")


@dataclass
class TrainConfig:
    epochs: int = option(1, "passes over the train data (max_steps wins if set)")
    max_steps: int | None = option(None, "optimizer steps; overrides epochs")
    global_batch_size: int = option(16, "examples (pairs for preference data) per optimizer step, over all ranks")
    micro_batch_size: int = option(8, "examples per forward on one rank; accumulation = global / (micro x ranks)")
    optimizer: str = option("adamw", "adamw | adam | sgd | adafactor (trainers/optim.py)")
    lr: float = option(1.0e-3, "peak learning rate; recipes take model.recommended's")
    weight_decay: float = option(0.0, "decoupled weight decay")
    betas: list[float] = option([0.9, 0.999], "Adam betas (torch's defaults)")
    eps: float = option(1.0e-8, "Adam epsilon (torch's default)")
    momentum: float = option(0.0, "sgd only: momentum (torch's default 0)")
    scheduler: str = option("cosine", "constant | linear | cosine | wsd (warmup-stable-decay)")
    warmup_ratio: float = option(0.1, "warmup as a fraction of the total steps; warmup_steps wins if set")
    warmup_steps: int | None = option(None, "warmup in steps")
    decay_ratio: float = option(0.1, "wsd only: fraction of steps in the final decay")
    max_grad_norm: float | None = option(1.0, "gradient-norm clip; null disables clipping")
    mixed_precision: Any = option("no", "no | bf16 | fp16 | auto (the launcher's): autocast over the weights "
                                  "(docs/distributed.md, Precision); untyped, so a bare YAML no gets config_check's "
                                  "message")
    on_nonfinite: str = option("stop", "stop | skip: a NaN/inf loss or gradient norm stops the run, or the step is "
                               "skipped and counted")
    neftune_alpha: float | None = option(None, "NEFTune (Jain et al. 2023) noise scale alpha/sqrt(L*d) on input "
                                            "embeddings; the paper uses 5, 10 or 15. SFT only")
    symnoise_alpha: float | None = option(None, "SymNoise (Yadav & Singh 2023): +-1 noise at NEFTune's scale "
                                             "alpha/sqrt(L*d) (trainers/embedding_noise.py). SFT only")
    symnoise_antithetic: bool = option(True, "SymNoise: each example's second half of positions carries the negated "
                                       "noise of its first half (docs/methods.md, SymNoise)")
    masked_thought: Any = option(None, "Masked Thought (Chen et al. 2024): {max_rate: 0.4, "
                                                      "warmup_ratio: 0.66, mask_token: null} (authors' GSM8K "
                                                      "scripts). SFT only")
    hft: Any = option(None, "Half Fine-Tuning (Hui et al. 2024, arXiv 2404.18466): {stage_steps: "
                                        "null, others: half}; each stage trains a random half (trainers/hft.py)")
    logits_chunk_size: int = option(1024, "labelled positions per LM-head chunk")
    attention_tile: int = option(128, "tiled_sdpa queries per tile: fastest of 64-256 on the CPU benchmark rows "
                                 "(docs/benchmarks.md)")
    sequence_parallel: int = option(1, "ranks that share each micro-batch's positions (DeepSpeed Ulysses, "
                                    "Jacobs et al. 2023, arXiv 2309.14509): 1 = off; divides the process count, "
                                    "DeepSpeed ZeRO-2/3 and tiled_sdpa only (docs/distributed.md)")
    logits_keep_mb: int = option(256, "MB of LM-head softmax kept from forward to backward per forward; 0 "
                                 "recomputes (measured, docs/benchmarks.md)")
    eval_every: int = option(50, "steps between evaluations; 0 = only before and after training")
    eval_at_start: bool = option(True, "evaluate before the first step (baseline; DPO's step-0 loss is log 2)")
    eval_batch_size: int = option(16, "examples per evaluation forward")
    eval_samples: int = option(0, "greedy answers to the first N eval prompts generated at each evaluation and "
                               "logged (samples.jsonl, TensorBoard text, wandb table); 0 = off")
    eval_sample_tokens: int = option(64, "new tokens at most per eval sample")
    log_every: int = option(5, "steps between logged train metrics")
    save_every: int = option(100, "steps between checkpoints; the final state is always saved")
    keep_last: int = option(2, "checkpoints kept")
    progress_bar: bool = option(True, "show a progress bar")
    plot: bool = option(True, "write loss plots at the end")
    trackers: list[str] = option([], "any of: wandb, tensorboard (both work offline)")
    wandb_mode: str = option("offline", "offline | online | disabled")
    project: str = option("tunelab", "tracker project name")


@dataclass
class OnlineConfig:
    enabled: bool = option(False, "online preference learning (Guo et al. 2024, arXiv 2402.04792): each step's "
                           "pairs are sampled from the current policy and labelled by online.reward_model "
                           "(trainers/online.py); prompts from the data config")
    reward_model: str | None = option(None, "sequence-classification reward model (a directory or hub id, e.g. a "
                                      "recipe=reward run's export/) that labels the samples")
    reward_dtype: str = option("float32", "dtype the reward model loads in")
    samples_per_prompt: int = option(2, "responses sampled per prompt; best vs worst form the pair (2: OAIF samples "
                                     "two per prompt, Guo et al. 2024)")
    temperature: float = option(1.0, "sampling temperature (1: the policy's own distribution, what on-policy means)")
    top_p: float = option(1.0, "nucleus sampling mass (1: no truncation of the policy's distribution)")
    max_new_tokens: int = option(64, "new tokens per sample at most (tiny default; raise for real models)")
    batch_size: int = option(8, "sequences per generation and per reward-model forward")
    backend: str = option("transformers", "transformers (the policy itself, any device) | vllm (a colocated vLLM "
                          "engine per rank, CUDA; the policy's weights pushed before each step: trainers/vllm_sync.py)")
    vllm_gpu_memory_utilization: float = option(0.3, "backend vllm: share of the GPU's memory the engine may take for "
                                                 "its weights and KV cache; the rest is training's (0.3: TRL's "
                                                 "colocated default, GRPOConfig.vllm_gpu_memory_utilization)")
    vllm_dtype: str = option("bfloat16", "backend vllm: the engine's dtype (pushed weights are cast to it on load); "
                             "bfloat16, vLLM's usual GPU dtype, halves a float32 policy's sync")


@dataclass
class ExportConfig:
    enabled: bool = option(True, "write the final model for inference")
    merge_lora: bool = option(True, "LoRA runs: also write the base model with the adapter merged in")


@dataclass
class RoundsConfig:
    count: int = option(0, "rounds of generate -> score -> pair -> train (trainers/rounds.py); 0 = an ordinary run")
    prompts: Any = option(None, "the prompts source, as a data source: {path, format, num_rows, seed, max_rows} "
                          "(SPIN: rows that also hold the gold response)")
    pairs: str = option("best_worst", "best_worst (iterative DPO/SimPO: best vs worst scored sample) | "
                        "gold_vs_generated (SPIN, Chen et al. 2024: the data's response vs a generated one)")
    samples: int = option(4, "responses sampled per prompt and round (best_worst); gold_vs_generated uses the first")
    temperature: float = option(0.8, "sampling temperature; 0.8 with top_p 0.95 is SimPO v0.2's on-policy setting "
                                "(recipes/generate/simpo_v02_llama3.yaml)")
    top_p: float = option(0.95, "nucleus sampling mass (SimPO v0.2)")
    max_new_tokens: int = option(256, "new tokens per sample at most")
    generation_batch_size: int = option(8, "sequences per generation forward (transformers backend)")
    backend: str = option("transformers", "transformers | vllm (GPU; trainers/generation.py)")
    reward_model: str | None = option(None, "sequence-classification reward model (a directory or hub id) that "
                                      "scores the samples; best_worst needs it")
    reward_batch_size: int = option(8, "conversations per reward-model forward")
    min_margin: float = option(0.0, "best_worst: a pair needs best - worst >= this reward margin")
    reference: str = option("round_start", "round_start (the round's starting policy) | initial (the run's initial "
                            "model) | none (reference-free losses only): the reference of each round")
    lr: Any = option(None, "null, or one learning rate per round (train.lr of that round's training)")
    selection: Any = option(None, "null (every prompt, every round) | {name: optune_lowest_reward, fraction: 0.5}: "
                            "which prompts are regenerated from round 1 on (data/prompt_selection.py)")


@dataclass
class RunConfig:
    output_dir: str | None = option(None, "null: a new runs/<recipe>/<time>_<id>; a given one must be empty "
                                       "unless resuming (docs/failure_behaviour.md)")
    seed: int = option(42, "seed of data order, initialisation and sampling")
    resume: str | None = option(None, "null | auto | latest | <checkpoint dir> (docs/failure_behaviour.md)")
    loss: dict[str, Any] = option({}, "set by the recipe: {<loss name>: {<options>, weight}}; options below")
    pair_weighting: Any = option(None, "null | {name: wpo, alignment: sampled|greedy} | {name: optune, form: "
                                 "margin|probability|linear, temperature: 1.0}")
    sftmix: Any = option(None, "SFTMix stage-2 settings (recipes/recipe/sftmix_objective.yaml)")
    data: dict[str, Any] = option({}, "the data config (recipes/data/, docs/data_formats.md); free keys")
    model: ModelConfig = block(ModelConfig, "the model (recipes/model/)")
    reference: ReferenceConfig = block(ReferenceConfig, "reference log-probs for losses that need them")
    train: TrainConfig = block(TrainConfig, "optimisation, evaluation, logging and checkpoints")
    online: OnlineConfig = block(OnlineConfig, "online DPO: fresh pairs from the policy every step; off by default")
    export: ExportConfig = block(ExportConfig, "the final model written at the end")
    rounds: RoundsConfig = block(RoundsConfig, "iterative rounds (iterative DPO/SimPO, SPIN); count 0 = off")


def register() -> None:
    """Store RunConfig as `base_schema`, the first entry of recipes/config.yaml's defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_schema", node=RunConfig)


def compose_config(overrides: list[str], return_hydra_config: bool = False):
    """The run config train.py would see for ``overrides`` (recipe=..., key=value), composed outside a Hydra app
    (scripts, benchmarks, tests)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _rows(kind: type, prefix: str) -> list[str]:
    rows = []
    for item in dataclasses.fields(kind):
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(_resolve(kind, item)):
            rows += _rows(_resolve(kind, item), key + ".")
            continue
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        kind_name = str(item.type).replace("Optional[", "").replace("]", "").replace("[", " of ")
        rows.append(f"| `{key}` | {_cell(kind_name)} | `{_cell(repr(default))}` | {_cell(item.metadata['help'])} |")
    return rows


def _resolve(kind: type, item: dataclasses.Field) -> Any:
    """The dataclass a field holds (also through ``X | None``), else None."""
    hint = inspect.get_annotations(kind, eval_str=True)[item.name]
    for member in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(member):
            return member
    return None


def documented_options(kind: type) -> dict[str, str]:
    """A loss's options as its class docstring lists them: lines ``- ``name``[, ``name``]: description``."""
    options, names = {}, []
    for line in inspect.cleandoc(kind.__dict__.get("__doc__") or "").splitlines():
        head, colon, text = line.partition(":")
        if line.startswith("- ``") and colon:
            names = re.findall(r"``(\w+)``", head)
            options.update(dict.fromkeys(names, text.strip()))
        elif line.startswith("  ") and names:  # a continuation line
            options.update({name: f"{options[name]} {line.strip()}" for name in names})
        else:
            names = []
    return options


def constructor_options(kind: type) -> dict[str, Any] | None:
    """Named constructor keywords with their defaults; None when it takes ``**options`` (checked by itself)."""
    params = [p for p in inspect.signature(kind).parameters.values()]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _option_rows(kind: type) -> list[str]:
    documented, defaults = documented_options(kind), constructor_options(kind) or {}
    if not documented:
        return ["No options (`weight` scales the term in a composed loss)."]
    rows = ["| option | default | description |", "| --- | --- | --- |"]
    for name, text in documented.items():
        default = f"`{_cell(repr(defaults[name]))}`" if name in defaults else "see description"
        rows.append(f"| `{name}` | {default} | {_cell(text)} |")
    return rows


def config_docs() -> str:
    """docs/config.md's text: every schema option, then every registered loss's and pair weighting's options."""
    from tunelab.losses import LOSSES, PAIR_WEIGHTINGS

    lines = ["# Config reference", "",
             "Generated by `tunelab.trainers.config_schema.config_docs()`; tests/test_config.py fails when this page "
             "is stale. Every default is defined once, in trainers/config_schema.py (run options) or in the loss's "
             "constructor (loss options); recipes and model/data configs override them. Types are checked as the "
             "config composes (a wrong type or a misspelt key fails naming the key); value rules are in "
             "trainers/config_check.py. The `data` block is described in docs/data_formats.md.", "",
             "## Run options", "", "| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += _rows(RunConfig, "")
    lines += ["", "## Loss options", "",
              "A recipe's `loss` block maps loss names to their options, e.g. `loss: {dpo: {beta: 0.1}, ntp: "
              "{weight: 0.2}}`; each option is a keyword of the loss's constructor, which rejects any other, and "
              "`weight` (default 1) scales the term in the sum. Formulas and sources: docs/methods*.md.", ""]
    for title, table in (("", LOSSES), ("pair weighting ", PAIR_WEIGHTINGS)):
        for name in sorted(n for n, kind in table.items() if kind.__module__.startswith("tunelab.")):  # not a test's
            summary = inspect.cleandoc(table[name].__dict__.get("__doc__") or "").split("\n")[0]
            lines += [f"### {title}`{name}`", "", summary, "", *_option_rows(table[name]), ""]
    return "\n".join(lines).rstrip() + "\n"
