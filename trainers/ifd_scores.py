"""IFD scores (Cherry LLM: Li et al. 2024, "From Quantity to Quality: Boosting LLM Performance with Self-Guided Data
Selection for Instruction Tuning", NAACL 2024; docs/methods.md, IFD): the Instruction-Following Difficulty of every
training example, written to a scores file that the data stage ``ifd_select`` (data/ifd.py) reads.

For an example with instruction Q and answer A (its labelled tokens), with s(.) the token-mean negative log-likelihood
of A's tokens:
    IFD = s(A | Q) / s(A)
s(A | Q) scores the tokenized example as training sees it (the prompt with its chat template, then the answer);
s(A) scores the same answer tokens after a single start token (the tokenizer's BOS, or its EOS where it has no BOS:
a document boundary that carries no instruction), so both means run over exactly the same tokens. Both come from
the chunked scoring pass the trainer uses (trainers/scoring.py; no full-vocabulary log-softmax). IFD near or above 1
says the instruction does not help predict the answer.

The file ``ifd_scores.json`` maps the content fingerprint of the tokenized train dataset to its entry, whose
``scorer`` key is built like the reference cache's (trainers/reference.py): the resolved model config, a fingerprint
of the weights, the layout and the scoring batch, chunk and tile sizes. Scoring the same dataset with the same scorer
again reads the file instead of running the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from tunelab.data.collate import Collator
from tunelab.data.fingerprint import dataset_fingerprint
from tunelab.data.ifd import STAGE_NAME, read_scores
from tunelab.data.pipeline import build_datasets
from tunelab.trainers.files import write_json_atomic
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.models import build_model, build_tokenizer
from tunelab.trainers.reference import weights_fingerprint
from tunelab.trainers.scoring import score_examples
from tunelab.trainers.sftmix_scores import load_checkpoint_weights, response_token_counts

log = logging.getLogger(__name__)


def start_token_id(tokenizer) -> int:
    """The token the answer-alone sequence starts from: BOS, or EOS for a tokenizer without one."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("IFD scores the answer alone after a start token, but the tokenizer has neither a BOS nor "
                         "an EOS token")
    return int(token)


def answer_alone(example: dict, index: int, start_id: int) -> dict:
    """The example's answer (its one run of labelled tokens) after the start token, every answer token labelled.
    Unlabelled text after the answer (a template's newline after the end-of-turn token) is not scored either way."""
    ids, mask = list(example["input_ids"]), list(example["target_mask"])
    first = mask.index(1) if 1 in mask else -1
    end = first + (mask[first:] + [0]).index(0) if first >= 0 else -1
    if first <= 0 or 1 in mask[end:]:
        where = "no position" if first < 0 else "the first position" if first == 0 else "more than one run"
        raise ValueError(f"IFD needs a single-turn example (a prompt, then one labelled answer); train example "
                         f"{index} has labels at {where}")
    answer = ids[first:end]
    return {"input_ids": [start_id] + answer, "target_mask": [0] + [1] * len(answer)}


def token_mean_nll(seq_logps: list[float], counts: list[int]) -> list[float]:
    return [-lp / n for lp, n in zip(seq_logps, counts)]


def ifd_ratios(given_prompt: list[float], alone: list[float]) -> list[float]:
    """s(A|Q) / s(A); an answer the model predicts perfectly alone (s(A) = 0) gets inf: the prompt cannot help."""
    return [c / a if a > 0 else math.inf for c, a in zip(given_prompt, alone)]


def score_ifd(accelerator, scorer: CausalLMWithLogProbs, dataset, collator: Collator, batch_size: int,
              start_id: int, progress: bool = True) -> dict[str, list[float]]:
    """s(A|Q), s(A) and IFD of every example of the tokenized SFT ``dataset``."""
    counts = response_token_counts(dataset)
    alone_ds = [answer_alone(dataset[i], i, start_id) for i in range(len(dataset))]
    given = score_examples(accelerator, scorer, dataset, collator, batch_size, description="IFD s(A|Q)",
                           progress=progress)
    alone = score_examples(accelerator, scorer, alone_ds, collator, batch_size, description="IFD s(A)",
                           progress=progress)
    nll_given = token_mean_nll([v[0] for v in given], counts)
    nll_alone = token_mean_nll([v[0] for v in alone], counts)
    return {"nll_given_prompt": nll_given, "nll_alone": nll_alone, "ifd": ifd_ratios(nll_given, nll_alone)}


def scoring_data_cfg(cfg):
    """The run's data config without the ``ifd_select`` stage (and anything after it): the dataset that stage sees."""
    full = OmegaConf.to_container(cfg, resolve=False)
    stages = list(full["data"].get("stages") or [])
    names = [dict(s).get("name") for s in stages]
    if STAGE_NAME in names:
        full["data"]["stages"] = stages[:names.index(STAGE_NAME)]
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.create(full).data, resolve=True))


def scorer_key(cfg, weights: str, collator: Collator, batch_size: int) -> str:
    parts = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "weights": weights,
        "scoring": {"batch_size": batch_size, "logits_chunk_size": cfg.train.logits_chunk_size,
                    "attention_tile": cfg.train.attention_tile, "layout": collator.kind,
                    "packing": collator.packing, "row_length": collator.row_length},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def score_config(cfg, output: str, checkpoint: str | None = None, batch_size: int | None = None,
                 force: bool = False) -> str:
    """IFD of every train example of the run config ``cfg`` (its model, data and seed) under its model's initial
    weights, or under a run ``checkpoint`` (the paper's briefly pre-trained model). Returns the scores file."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = build_tokenizer(cfg.model)
    with accelerator.main_process_first():
        train_ds, _, _ = build_datasets(scoring_data_cfg(cfg), tokenizer, "sft", cfg.seed)
    fingerprint = dataset_fingerprint(train_ds)
    collator = Collator("sft", packing=cfg.data.packing, shared_prompt=cfg.data.shared_prompt,
                        row_length=cfg.data.max_length)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    wrapper = CausalLMWithLogProbs(model, cfg.train.logits_chunk_size,
                                   attention_tile=cfg.train.attention_tile).to(accelerator.device)
    if checkpoint:
        load_checkpoint_weights(wrapper, checkpoint)
    batch_size = batch_size or cfg.train.eval_batch_size
    key = scorer_key(cfg, weights_fingerprint(wrapper), collator, batch_size)
    store = read_scores(output) if os.path.isfile(output) else {}
    entry = store.get(fingerprint)
    if entry and entry.get("scorer") == key and not force:
        log.info("IFD of %d examples: cached in %s", len(train_ds), output)
        return output
    values = score_ifd(accelerator, wrapper, train_ds, collator, batch_size, start_token_id(tokenizer),
                       progress=cfg.train.progress_bar)
    finite = [v for v in values["ifd"] if math.isfinite(v)]
    log.info("IFD of %d examples: mean %.3f, %d above 1", len(finite), sum(finite) / max(len(finite), 1),
             sum(v > 1 for v in values["ifd"]))
    if accelerator.is_main_process:
        store[fingerprint] = {"scorer": key, "num_examples": len(train_ds), "checkpoint": checkpoint,
                              "seed": int(cfg.seed), **values}
        write_json_atomic(output, store)
    accelerator.wait_for_everyone()
    return output
