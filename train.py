"""tunelab entry point: `python train.py` or `accelerate launch train.py recipe=<name> [key=value ...]`."""

import logging

import hydra
from accelerate import PartialState
from hydra.core.hydra_config import HydraConfig

from tunelab.data.sources import expand_short_form, sources_overridden
from tunelab.trainers.config_schema import register
from tunelab.trainers.distributed import exit_run
from tunelab.trainers.interrupt import TrainingInterrupted
from tunelab.trainers.logs import setup_logging
from tunelab.trainers.rounds import run_rounds
from tunelab.trainers.trainer import Trainer


@hydra.main(config_path="recipes", config_name="config", version_base=None)
def main(cfg) -> None:
    setup_logging()
    recipe = HydraConfig.get().runtime.choices.get("recipe", "run")
    expand_short_form(cfg.data, sources_given=sources_overridden(HydraConfig.get().overrides.task))
    try:
        if cfg.rounds.count > 0:  # iterative rounds (trainers/rounds.py): a config switch, whatever the loss
            run_rounds(cfg, recipe_name=recipe.replace("/", "-"))
        else:
            Trainer(cfg, recipe_name=recipe.replace("/", "-")).fit()
    except TrainingInterrupted as stopped:  # every rank stopped after the same step, with its checkpoint written
        if PartialState().is_main_process:
            logging.getLogger("tunelab").warning("%s", stopped)
        exit_run(stopped.exit_code)
    exit_run()


if __name__ == "__main__":
    register()  # the typed schema recipes/config.yaml composes on
    main()
