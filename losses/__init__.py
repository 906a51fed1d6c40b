"""Loss registry: every loss module registers itself by name; recipes pick losses by those names."""

# Importing the loss modules registers them.
import tunelab.losses.kto  # noqa: F401
from tunelab.losses import cpo, dpo, ntp, optune, orpo, reward, rpo, sftmix, simpo, wpo  # noqa: F401
from tunelab.losses.compose import LossSet, build_loss
from tunelab.losses.registry import LOSSES, PAIR_WEIGHTINGS, register_loss, register_pair_weighting

__all__ = ["LOSSES", "PAIR_WEIGHTINGS", "LossSet", "build_loss", "register_loss", "register_pair_weighting"]
