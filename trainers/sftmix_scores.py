"""SFTMix stage 1 (Xiao et al. 2024, arXiv 2410.05248; docs/methods_sftmix.md): the confidence of every training
example under the checkpoints of a finished NTP reference run, written to a scores file that the data stage
``sftmix_split`` (data/sftmix.py) reads.

For every training example and every chosen checkpoint c, the perplexity of the response given the prompt is
``PPL_c = exp(-(1/|y|) sum_t log p_c(y_t | x, y_<t))`` over the labelled (response) tokens, and
``Conf = -(1/C) sum_c PPL_c`` (the mean negative perplexity). ``score_run`` computes it with the chunked forward the
trainer uses (trainers/scoring.py; no full-vocabulary log-softmax) and stores it in ``<run>/sftmix_confidence.json``
under the content fingerprint of the tokenized train dataset, so a later run can check that the scores belong to
exactly the dataset it builds.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from tunelab.data.collate import Collator
from tunelab.data.fingerprint import dataset_fingerprint
from tunelab.data.pipeline import build_datasets
from tunelab.data.sftmix import CONFIDENCE_FILE, STAGE_NAME, read_scores
from tunelab.trainers.checkpoint import PREFIX, checkpoint_dir, complete_checkpoints, read_model_state, read_state
from tunelab.trainers.files import write_json_atomic
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.models import build_model, build_tokenizer
from tunelab.trainers.reference import weights_fingerprint
from tunelab.trainers.scoring import score_examples

log = logging.getLogger(__name__)


def response_token_counts(dataset) -> list[int]:
    """Labelled tokens per SFT example, counted as the collator counts them (no label on the first token)."""
    return [int(sum(mask[1:])) for mask in dataset["target_mask"]]


def perplexities(seq_logps: list[float], counts: list[int]) -> list[float]:
    """exp of the token-mean NLL of each response."""
    return [math.exp(-lp / max(n, 1)) for lp, n in zip(seq_logps, counts)]


def confidence(ppl_per_checkpoint: list[list[float]]) -> list[float]:
    """Conf = mean over checkpoints of -PPL."""
    if not ppl_per_checkpoint:
        raise ValueError("no checkpoints to average confidence over")
    n_ckpt = len(ppl_per_checkpoint)
    return [-sum(values) / n_ckpt for values in zip(*ppl_per_checkpoint)]


def select_checkpoints(run_dir: str, spec="all") -> list[str]:
    """Checkpoint directories of a finished run: ``all``, ``last_K``, or a list of names / step numbers."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{checkpoint_dir(run_dir)} has no complete checkpoint (step_*/ with trainer_state)")
    if isinstance(spec, str) and spec == "all":
        return found
    if isinstance(spec, str) and re.fullmatch(r"last_\d+", spec):
        k = int(spec.split("_")[1])
        if k < 1:
            raise ValueError("checkpoints=last_K needs K >= 1")
        return found[-k:]
    if isinstance(spec, (int, str)):
        spec = [s for s in str(spec).strip("[]").split(",") if s.strip()]
    by_name = {os.path.basename(p): p for p in found}
    chosen = []
    for item in spec:
        item = str(item).strip()
        name = item if item.startswith(PREFIX) else f"{PREFIX}{int(item):07d}"
        if name not in by_name:
            raise FileNotFoundError(f"checkpoint {item!r} not in {checkpoint_dir(run_dir)}; have: {', '.join(by_name)}")
        chosen.append(by_name[name])
    return chosen


def scoring_data_cfg(data_cfg):
    """The data config without the ``sftmix_split`` stage (and anything after it): the dataset that stage sees."""
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    stages = list(data_cfg.get("stages") or [])
    names = [s.get("name") for s in stages]
    if STAGE_NAME in names:
        data_cfg.stages = stages[:names.index(STAGE_NAME)]
    return data_cfg


def load_checkpoint_weights(wrapper: torch.nn.Module, checkpoint: str) -> None:
    """Load a checkpoint's model state into the ``CausalLMWithLogProbs`` wrapper (tied weights may be absent, and
    so may the frozen base of a LoRA checkpoint that stores only its trainable weights: the wrapper, built from the
    run's config, already holds that base, as a resumed run does)."""
    state = read_model_state(checkpoint)
    path = checkpoint
    missing, unexpected = wrapper.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"{path}: unexpected keys for this model config, e.g. {unexpected[:3]}")
    params = dict(wrapper.named_parameters(remove_duplicate=False))
    loaded = {params[name].data_ptr() for name in state if name in params}
    if read_state(checkpoint).get("model_weights") == "trainable":
        missing = [name for name in missing if name in params and params[name].requires_grad]
    untied = [name for name in missing if name in params and params[name].data_ptr() not in loaded]
    if untied:
        raise KeyError(f"{path}: missing weights {untied[:3]} (not tied to a loaded weight)")


def score_run(run_dir: str, checkpoints="all", overrides=(), output: str | None = None,
              batch_size: int | None = None, force: bool = False) -> str:
    """Stage 1: confidence of every train example under the chosen checkpoints of a finished NTP run.

    The model and data come from ``<run_dir>/config.yaml`` (``overrides``: OmegaConf dotlist applied on top,
    e.g. ``data.sources.0.num_rows=400``). Returns the path of the scores file.
    """
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: run_dir must be a finished tunelab run directory")
    cfg = OmegaConf.load(cfg_path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    chosen = select_checkpoints(run_dir, checkpoints)
    output = output or os.path.join(run_dir, CONFIDENCE_FILE)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    tokenizer = build_tokenizer(cfg.model)
    data_cfg = scoring_data_cfg(cfg.data)
    with accelerator.main_process_first():
        train_ds, _, _ = build_datasets(data_cfg, tokenizer, "sft", cfg.seed)
    fingerprint = dataset_fingerprint(train_ds)
    counts = response_token_counts(train_ds)
    store = read_scores(output) if os.path.isfile(output) else {}
    entry = store.get(fingerprint, {})
    known = {} if force else entry.get("perplexity", {})

    collator = Collator("sft", packing=cfg.data.packing, shared_prompt=cfg.data.shared_prompt,
                        row_length=cfg.data.max_length)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    wrapper = CausalLMWithLogProbs(model, cfg.train.logits_chunk_size).to(accelerator.device)
    per_checkpoint = {}
    for path in chosen:
        name = os.path.basename(path)
        load_checkpoint_weights(wrapper, path)
        weights = weights_fingerprint(wrapper)
        cached = known.get(name)
        if cached and cached.get("weights") == weights and len(cached["values"]) == len(train_ds):
            per_checkpoint[name] = cached
            log.info("sftmix confidence: %s cached", name)
            continue
        start = time.time()
        if accelerator.is_main_process:
            log.info("sftmix confidence: scoring all %d train examples under %s (the split ranks every example)",
                     len(train_ds), name)
        logps = score_examples(accelerator, wrapper, train_ds, collator, batch_size or cfg.train.eval_batch_size,
                               description=f"sftmix confidence ({name})", progress=cfg.train.progress_bar)
        values = perplexities([sum(v) for v in logps], counts)
        per_checkpoint[name] = {"weights": weights, "values": values}
        log.info("sftmix confidence: %s scored %d examples in %.1fs (mean PPL %.3f)", name, len(values),
                 time.time() - start, sum(values) / len(values))
    names = [os.path.basename(p) for p in chosen]
    entry = {
        "num_examples": len(train_ds),
        "checkpoints": names,
        "confidence": confidence([per_checkpoint[n]["values"] for n in names]),
        "perplexity": {**known, **per_checkpoint},
        "run_dir": os.path.abspath(run_dir),
        "seed": int(cfg.seed),
    }
    if accelerator.is_main_process:
        store[fingerprint] = entry
        write_json_atomic(output, store)
        log.info("sftmix confidence of %d examples (fingerprint %s, checkpoints %s) -> %s", len(train_ds),
                 fingerprint, ", ".join(names), output)
    accelerator.wait_for_everyone()
    return output
