"""Model scoring: the per-sequence log-probs of chosen examples of a dataset under a model, split over the ranks and
gathered back in the order asked for, with a progress bar on the main process.

Every model pass over data outside the training loop uses it: the reference precomputation (trainers/reference.py),
SFTMix's confidence (trainers/sftmix_scores.py), and anything that scores examples with log-probs (IFD selection,
reward scoring). ``rank_batches`` is the one rule for splitting items over ranks, evaluation included.
"""

from __future__ import annotations

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from tunelab.data.contract import Needs
from tunelab.trainers.forward import CausalLMWithLogProbs

NO_STATS = Needs()


def rank_batches(num_items: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches of the positions ``0 .. num_items-1``: one contiguous block per rank, cut into batches of
    ``batch_size``. Every rank gets the same number of batches; a rank that runs out gets empty ones at the end and
    must still run a forward for each (ZeRO-3 gathers weights collectively, so the ranks go in lockstep)."""
    per_rank = -(-num_items // world_size)
    start, stop = min(num_items, rank * per_rank), min(num_items, (rank + 1) * per_rank)
    return [list(range(min(stop, start + s * batch_size), min(stop, start + (s + 1) * batch_size)))
            for s in range(-(-per_rank // batch_size))]


def gather_in_order(accelerator, results: dict[int, object], num_items: int) -> list:
    """Each rank's ``{position: value}`` for its positions, as one list in position order, on every rank."""
    parts = gather_object([results]) if accelerator.num_processes > 1 else [results]
    merged = {pos: value for part in parts for pos, value in part.items()}
    return [merged[pos] for pos in range(num_items)]


def score_examples(accelerator, scorer: CausalLMWithLogProbs, dataset, collator, batch_size: int,
                   indices: list[int] | None = None, description: str = "scoring",
                   progress: bool = True, with_prefix: bool = False) -> list[list[float]]:
    """The per-sequence log-probs (one per sequence of the example: SFT 1, a pair 2) of ``dataset[i]`` for each ``i``
    in ``indices`` (default: every example), in that order, under ``scorer`` in eval mode; ``with_prefix`` appends
    the same number of common-prefix log-probs (``ForwardOutputs.seq_prefix_logps``). Every rank must call it with
    the same arguments. The bar counts examples over all ranks (so its rate and ETA are the run's)."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    world = accelerator.num_processes
    mine = rank_batches(len(indices), batch_size, accelerator.process_index, world)
    every_rank = [rank_batches(len(indices), batch_size, r, world) for r in range(world)]
    results: dict[int, list[float]] = {}
    bar = tqdm(total=len(indices), unit="ex", desc=description, dynamic_ncols=True,
               disable=not (accelerator.is_main_process and progress))
    was_training = accelerator.unwrap_model(scorer).training  # a DeepSpeed engine's own flag is always True
    scorer.eval()
    with torch.no_grad():
        for step, positions in enumerate(mine):
            examples = [dataset[indices[p]] for p in (positions or [0])]  # [0]: a forward to stay in lockstep
            out = scorer(collator(examples).to(accelerator.device), NO_STATS)
            values = out.seq_logps.float().view(len(examples), -1)
            if with_prefix:
                values = torch.cat([values, out.seq_prefix_logps.float().view(len(examples), -1)], dim=1)
            values = values.tolist()
            results.update(zip(positions, values))
            bar.update(sum(len(batches[step]) for batches in every_rank))
    bar.close()
    scorer.train(was_training)
    return gather_in_order(accelerator, results, len(indices))
