"""Preference-training benchmark on CPU: tunelab's Trainer vs TRL, DPO (sigmoid) and SimPO, in one invocation.

    python scripts/bench_preference.py                 # all runs, ~10 measured steps each
    python scripts/bench_preference.py --quick         # smoke run (few steps)
    python scripts/bench_preference.py --runs ours-dpo,trl-dpo-precomputed --steps 5

Workload (docs/benchmarks.md): random-init Llama (hidden 256, 4 layers, 4 heads, intermediate 688, tied
embeddings) over the SmolLM2 tokenizer (vocabulary 49152), fp32; 8 pairs per step, prompts of 20-120 words and
responses of 10-100 words from a seeded RNG (the same rows for every run); AdamW at a constant learning rate,
gradient clipping at 1.0. Runs (each in its own subprocess, so peak RSS is per framework):

- ``ours-dpo``: tunelab's Trainer, recipe=dpo, reference.strategy=precomputed (packed rows, shared prompt).
- ``ours-dpo-lean``: ``ours-dpo`` at its least memory: train.logits_keep_mb=0 train.logits_chunk_size=128 (the
  LM-head softmax recomputed in the backward, not kept, over chunks of 128 labelled positions).
- ``ours-dpo-unshared``: ``ours-dpo`` with data.shared_prompt=false (the prompt computed twice, once per response).
- ``ours-dpo-dense-attn``: ``ours-dpo`` with model.attn_implementation=sdpa (dense masked attention, not tiled).
- ``ours-dpo-live-ref``: the same with reference.strategy=frozen_copy (a reference forward every step, as TRL).
- ``trl-dpo``: TRL's DPOTrainer with its default live reference model.
- ``trl-dpo-precomputed``: the same with ``precompute_ref_log_probs=True``.
- ``ours-simpo``: tunelab's Trainer, recipe=simpo.
- ``ours-simpo-lean``: ``ours-simpo`` with the lean settings of ``ours-dpo-lean``.
- ``trl-simpo``: TRL's CPOTrainer (trl.experimental.cpo) with loss_type="simpo", cpo_alpha=0.

Before the timed runs, ``--check-steps`` steps of our Trainer are replayed by a naive implementation of the same
objective (full [2B, T, V] logits and log_softmax over a right-padded [chosen; rejected] batch, the same initial
weights, data and AdamW), and the per-step losses must agree within 1e-4.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import bench_common as bc

RUNS = ("ours-dpo", "ours-dpo-lean", "ours-dpo-unshared", "ours-dpo-dense-attn", "ours-dpo-live-ref", "trl-dpo",
        "trl-dpo-precomputed", "ours-simpo", "ours-simpo-lean", "trl-simpo")
PAIRS_PER_STEP = 8
LR = 1e-4
BETA_DPO = 0.1
BETA_SIMPO, GAMMA_BETA_RATIO = 2.0, 0.25
LEAN = ("train.logits_keep_mb=0", "train.logits_chunk_size=128")


def our_overrides(args, loss: str, data_path: str, tmp: str, steps: int, reference: str = "precomputed",
                  extra: tuple[str, ...] = ()) -> list[str]:
    chunk = [f"train.logits_chunk_size={args.chunk_size}"] if args.chunk_size else []
    loss_args = ([f"loss.dpo.beta={BETA_DPO}"] if loss == "dpo" else
                 [f"loss.simpo.beta={BETA_SIMPO}", f"loss.simpo.gamma_beta_ratio={GAMMA_BETA_RATIO}"])
    return [
        f"recipe={loss}", *bc.model_overrides(args.small), *loss_args, *chunk,
        f"data.sources=[{{path:'{data_path}',format:pairwise_strings}}]",
        "data.eval_fraction=0", f"data.max_length={args.row_length}", f"data.max_prompt_length={args.row_length - 1}",
        f"train.global_batch_size={PAIRS_PER_STEP}", f"train.micro_batch_size={PAIRS_PER_STEP}",
        f"train.max_steps={steps}", "train.optimizer=adamw", f"train.lr={LR}", "train.scheduler=constant",
        "train.warmup_steps=0", "train.weight_decay=0.0", "train.max_grad_norm=1.0", "train.progress_bar=false",
        "train.plot=false", "train.eval_every=0", "train.log_every=100000", "train.save_every=100000",
        f"reference.strategy={reference}", f"reference.cache_dir={tmp}/ref", f"output_dir={tmp}/out",
        "export.enabled=false", *extra,
    ]


def make_data(args, tmp: str) -> str:
    rows = bc.pref_rows((args.warmup + args.steps) * PAIRS_PER_STEP, args.seed)
    return bc.write_jsonl(rows, os.path.join(tmp, "pref.jsonl"))


# ---- children ---------------------------------------------------------------------------------------------------
def child_ours(args, loss: str, reference: str = "precomputed", extra: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_pref_")
    trainer, recorder = bc.recorded_trainer(our_overrides(args, loss, make_data(args, tmp), tmp,
                                                          args.warmup + args.steps, reference, extra))
    return bc.measure_steps(trainer, recorder, args.warmup, args.steps, time.perf_counter() - start)


def _trl_common(args, tmp: str):
    from tunelab.trainers.models import build_model

    tokenizer = bc.load_tokenizer(args.small)
    cfg = bc.compose_cfg(bc.model_overrides(args.small))
    model = build_model(cfg.model, tokenizer, cfg.seed)
    return tokenizer, model


def child_trl_dpo(args, precompute: bool) -> dict:
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_trl_")
    tokenizer, model = _trl_common(args, tmp)
    rows = bc.pref_rows((args.warmup + args.steps) * PAIRS_PER_STEP, args.seed)
    ds = bc.trl_pairs_dataset(rows)
    lengths: list = []

    class Recorded(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            lengths.append(bc.trl_dpo_lengths(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    config = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        max_length=None, beta=BETA_DPO, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
        seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
    )
    # a live reference is the initial model; TRL would reload it from the policy's config path, which a model
    # built in code does not have
    reference = None if precompute else copy.deepcopy(model).eval()
    trainer = Recorded(model=model, ref_model=reference, args=config, train_dataset=ds, processing_class=tokenizer)
    return bc.train_trl(trainer, lengths, args.warmup, start)


def child_trl_simpo(args) -> dict:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_trl_")
    tokenizer, model = _trl_common(args, tmp)
    rows = bc.pref_rows((args.warmup + args.steps) * PAIRS_PER_STEP, args.seed)
    ds = bc.trl_pairs_dataset(rows)
    lengths: list = []

    class Recorded(CPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            p = inputs["prompt_attention_mask"].sum(1)
            c = (inputs["chosen_labels"] != -100).sum(1)
            r = (inputs["rejected_labels"] != -100).sum(1)
            lengths.append([[int(p[i]), int(c[i]), int(r[i])] for i in range(len(p))])
            return super().training_step(model, inputs, num_items_in_batch)

    config = CPOConfig(
        output_dir=tmp, per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        max_length=2048, loss_type="simpo", cpo_alpha=0.0, beta=BETA_SIMPO, simpo_gamma=BETA_SIMPO * GAMMA_BETA_RATIO,
        seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
    )
    trainer = Recorded(model=model, args=config, train_dataset=ds, processing_class=tokenizer)
    return bc.train_trl(trainer, lengths, args.warmup, start)


# ---- exactness check --------------------------------------------------------------------------------------------
def naive_pair_logps(model, examples: list[dict], pad_id: int):
    """Sum and mean log-probs of chosen and rejected responses from full logits of a padded [chosen; rejected]
    batch (prompt repeated in both rows), the way a straightforward implementation computes them."""
    import torch

    rows = [(ex["prompt_ids"], ex[key]) for key in ("chosen_ids", "rejected_ids") for ex in examples]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1)
    target = labels[:, 1:]
    keep = target != -100
    token = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * keep
    sums, counts = token.sum(-1), keep.sum(-1)
    n = len(examples)
    return sums[:n], sums[n:], counts[:n], counts[n:]


def check_losses(args, loss: str) -> dict:
    """Our Trainer's per-step losses vs a naive full-logits implementation of the same objective."""
    import torch
    import torch.nn.functional as F

    steps = args.check_steps
    tmp = tempfile.mkdtemp(prefix="bench_check_")
    tokenizer = bc.load_tokenizer(args.small)
    cfg = bc.compose_cfg(our_overrides(args, loss, make_data(args, tmp), tmp, steps))
    trainer = bc.build_our_trainer(cfg)
    model = trainer.accelerator.unwrap_model(trainer.policy).model
    naive = copy.deepcopy(model).train()
    reference = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(naive.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    recorder = bc.record_batches(trainer)
    ours, theirs = [], []
    for _ in range(steps):
        seen = len(recorder.seen)
        ours.append(trainer.train_step().loss)
        examples = [ex for mb in recorder.seen[seen:] for ex in mb]
        pc, pr, nc, nr = naive_pair_logps(naive, examples, tokenizer.pad_token_id)
        if loss == "dpo":
            with torch.no_grad():
                rc, rr, _, _ = naive_pair_logps(reference, examples, tokenizer.pad_token_id)
            losses = -F.logsigmoid(BETA_DPO * ((pc - rc) - (pr - rr)))
        else:
            u = pc / nc - pr / nr
            losses = -F.logsigmoid(BETA_SIMPO * u - BETA_SIMPO * GAMMA_BETA_RATIO)
        step_loss = losses.mean()
        optimizer.zero_grad()
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(naive.parameters(), 1.0)
        optimizer.step()
        theirs.append(float(step_loss))
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    return {"loss": loss, "ours": ours, "naive": theirs, "max_abs_diff": diff, "ok": diff <= 1e-4}


# ---- parent -----------------------------------------------------------------------------------------------------
def child_main(args) -> None:
    if args.check:
        bc.child_report(args.json, name=f"check-{args.check}", **check_losses(args, args.check))
        return
    name = args.child
    report = {"ours-dpo": lambda: child_ours(args, "dpo"), "ours-simpo": lambda: child_ours(args, "simpo"),
              "ours-dpo-lean": lambda: child_ours(args, "dpo", extra=LEAN),
              "ours-dpo-unshared": lambda: child_ours(args, "dpo", extra=("data.shared_prompt=false",)),
              "ours-dpo-dense-attn": lambda: child_ours(args, "dpo", extra=("model.attn_implementation=sdpa",)),
              "ours-dpo-live-ref": lambda: child_ours(args, "dpo", "frozen_copy"),
              "ours-simpo-lean": lambda: child_ours(args, "simpo", extra=LEAN),
              "trl-dpo": lambda: child_trl_dpo(args, False), "trl-dpo-precomputed": lambda: child_trl_dpo(args, True),
              "trl-simpo": lambda: child_trl_simpo(args)}[name]()
    bc.child_report(args.json, name=name, **report)


def main(argv=None) -> int:
    args = bc.parse_args(__doc__, RUNS, argv)
    if args.child or args.check:
        child_main(args)
        return 0
    script = os.path.abspath(__file__)
    machine = bc.MachinePeak()
    runs = [r for r in args.runs.split(",") if r]
    checks = [bc.run_child([script, "--check", loss, *bc.forward_args(args)])
              for loss in ("dpo", "simpo") if args.check_steps and any(loss in r for r in runs)]
    reports = [bc.run_child([script, "--child", run, *bc.forward_args(args)]) for run in runs]
    dims, peak = bc.dims_of(reports, args.small), machine.remeasure()
    rows = {r["name"]: bc.summarize(r, dims, peak) for r in reports}
    lines = [f"Preference benchmark: {machine.line()}; {args.warmup} warm-up + {args.steps} measured steps, "
             f"{PAIRS_PER_STEP} pairs/step; {bc.dims_line(dims)}", ""]
    tables = (("DPO (sigmoid)", ("trl-dpo", "trl-dpo-precomputed", "ours-dpo-live-ref", "ours-dpo-unshared",
                                "ours-dpo-dense-attn", "ours-dpo", "ours-dpo-lean")),
              ("SimPO", ("trl-simpo", "ours-simpo", "ours-simpo-lean")))
    for loss, members in tables:
        present = [rows[m] for m in members if m in rows]
        if present:
            lines += [f"### {loss}", "", bc.markdown_table(present, baseline=members[0]), ""]
    lines += bc.check_lines(checks) + bc.run_lines(reports, rows)
    return bc.finish(lines, args, checks)


if __name__ == "__main__":
    sys.exit(main())
