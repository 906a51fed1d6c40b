"""Loss registry: every loss module registers itself by name; recipes pick losses by those names."""

from losses.registry import LOSSES, PAIR_WEIGHTINGS, register_loss, register_pair_weighting
from losses.compose import LossSet, build_loss

# Importing the modules registers them.
from losses import ntp  # noqa: F401,E402

__all__ = ["LOSSES", "PAIR_WEIGHTINGS", "LossSet", "build_loss", "register_loss", "register_pair_weighting"]
