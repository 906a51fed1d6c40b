"""IFD data selection: the scores against a naive full-logits computation, the stage's choice on hand-made scores,
and the recipe's score-then-train chain."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from accelerate import Accelerator
from conftest import make_cfg, read_metrics
from test_layout import sft_examples, tiny_model

from tunelab.data.collate import Collator
from tunelab.data.fingerprint import dataset_fingerprint
from tunelab.data.ifd import ifd_select, select_by_ifd
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.ifd_scores import answer_alone, score_config, score_ifd
from tunelab.trainers.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def naive_mean_nll(model, ids: list[int], first_answer: int) -> float:
    """Token-mean NLL of ids[first_answer:] from one full-vocabulary log-softmax over the whole sequence."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    targets = torch.tensor(ids[first_answer:])
    return -logp[first_answer - 1:len(ids) - 1].gather(1, targets[:, None]).mean().item()


def test_ifd_equals_the_naive_full_logits_ratio():
    scorer = tiny_model()
    examples = datasets.Dataset.from_list(sft_examples())
    start = 1
    values = score_ifd(Accelerator(cpu=True), scorer, examples, Collator("sft", True, False, 32), batch_size=3,
                       start_id=start, progress=False)
    for i, ex in enumerate(examples):
        first = ex["target_mask"].index(1)
        given = naive_mean_nll(scorer.model, ex["input_ids"], first)
        alone = naive_mean_nll(scorer.model, [start] + ex["input_ids"][first:], 1)
        assert values["nll_given_prompt"][i] == pytest.approx(given, abs=1e-5)
        assert values["nll_alone"][i] == pytest.approx(alone, abs=1e-5)
        assert values["ifd"][i] == pytest.approx(given / alone, rel=1e-5)


def test_ifd_refuses_multi_turn_examples_naming_the_example():
    with pytest.raises(ValueError, match="train example 3 has labels at more than one run"):
        answer_alone({"input_ids": [5, 6, 7, 8, 9], "target_mask": [0, 1, 0, 1, 1]}, 3, start_id=1)
    assert answer_alone({"input_ids": [5, 6, 7, 8, 9], "target_mask": [0, 0, 1, 1, 0]}, 0, 1) == {
        "input_ids": [1, 7, 8], "target_mask": [0, 1, 1]}  # the unlabelled tail is not part of the answer


IFD = [0.5, 1.2, 0.9, float("inf"), 0.7, 0.95, 0.3, 0.8, 1.0, 0.6]


def test_selection_drops_ifd_above_one_and_keeps_the_top_fraction():
    assert select_by_ifd(IFD, 0.3) == [2, 5, 8]  # 1.2 and inf dropped; 1.0, 0.95, 0.9 are the top three
    assert select_by_ifd(IFD, 1.0) == [0, 2, 4, 5, 6, 7, 8, 9]  # all that pass the filter
    assert select_by_ifd([0.5, 0.5, 0.4], 0.34) == [0]  # a tie goes to the lower index
    with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\]"):
        select_by_ifd(IFD, 0.0)


def test_stage_reads_the_scores_of_exactly_this_dataset(tmp_path):
    data = datasets.Dataset.from_dict({"input_ids": [[i, i + 1, i + 2] for i in range(10)],
                                       "target_mask": [[0, 1, 1]] * 10})
    path = tmp_path / "ifd_scores.json"
    path.write_text(json.dumps({dataset_fingerprint(data): {"ifd": IFD}}))
    kept = ifd_select(data, "train", 0, scores=str(path), keep_fraction=0.3)
    assert [ids[0] for ids in kept["input_ids"]] == [2, 5, 8]
    assert ifd_select(data, "eval", 0, scores=str(path)) is data
    with pytest.raises(ValueError, match="has no IFD scores for this train dataset"):
        ifd_select(data.select(range(9)), "train", 0, scores=str(path))
    with pytest.raises(FileNotFoundError, match="scripts/ifd_score.py"):
        ifd_select(data, "train", 0, scores=str(tmp_path / "none.json"))


@pytest.mark.slow
def test_recipe_scores_then_trains_on_the_selection(tmp_path):
    scores = str(tmp_path / "ifd_scores.json")
    common = ["recipe=sft_ifd", "train.progress_bar=false", "data.sources.0.num_rows=200"]
    score_config(make_cfg(common, fast=False), scores)
    entry = next(iter(json.load(open(scores)).values()))
    assert len(entry["ifd"]) == len(entry["nll_alone"]) > 100 and all(v > 0 for v in entry["nll_alone"])
    before = entry["scorer"]
    score_config(make_cfg(common, fast=False), scores)  # same data and scorer: read, not scored again
    assert next(iter(json.load(open(scores)).values()))["scorer"] == before
    reset_accelerate()
    cfg = make_cfg([*common, f"data.stages.0.scores={scores}", "data.stages.0.keep_fraction=0.5",
                    f"output_dir={tmp_path / 'run'}", "export.enabled=false", "train.max_steps=4",
                    "train.eval_every=0", "train.log_every=1", "train.plot=false"], fast=False)
    trainer = Trainer(cfg, recipe_name="sft_ifd")
    kept = [v for v in entry["ifd"] if v <= 1.0]
    assert len(trainer.train_ds) == min(len(kept), round(0.5 * len(entry["ifd"])))
    trainer.fit()
    assert len(read_metrics(str(tmp_path / "run"))) == 4
