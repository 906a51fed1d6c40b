"""Trainer core: model building, the chunked forward, reference scoring, checkpoints, tracking and the loop."""
