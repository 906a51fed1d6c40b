"""MCTune (docs/mctune_notes.md): control tags from a response's linguistic features, and their evaluation.

MCTune conditions instruction tuning on linguistic features of the ground-truth response: each training
example gets a few ``[name: value]`` tags appended to its alpaca ``input`` field, and the model learns to write
a response that has those values. One module per job: ``nlp`` (tokens, POS tags, lemmas), ``features`` (the 14
features of a text), ``quantize`` (float features into buckets), ``tags`` (sample, format, parse),
``perturb`` (held-out test tags), ``stage`` (the registered ``mctune`` data stage) and ``evaluation``
(controllability scores of generated texts). Importing the package registers the stage and loads no NLP model.
"""

from tunelab.data.mctune.evaluation import (
    DEFAULT_TOLERANCE,
    evaluate,
    format_table,
    read_pairs,
    resolve_tolerance,
    run_eval,
    tag_met,
    write_report,
)
from tunelab.data.mctune.features import (
    DERIVED,
    DESCRIPTIONS,
    FEATURES,
    FLOAT_FEATURES,
    FOUNDATIONAL,
    INT_FEATURES,
    count_syllables,
    derive_features,
    extract_features,
    features_from_tokens,
    fkre,
)
from tunelab.data.mctune.nlp import Token, get_backend
from tunelab.data.mctune.perturb import PerturbationError, consistency_violations, feature_stds, perturb_features
from tunelab.data.mctune.quantize import QUANTIZE_MODES, Quantizer, fit_quantizer
from tunelab.data.mctune.stage import (
    FEATURES_COLUMN,
    TAGS_COLUMN,
    add_control_tags,
    add_features,
    mctune_stage,
    row_features,
)
from tunelab.data.mctune.tags import (
    build_preamble,
    check_candidates,
    compose_input,
    format_tags,
    format_value,
    parse_tags,
    sample_tags,
    tag_values,
)

__all__ = [
    "DEFAULT_TOLERANCE", "DERIVED", "DESCRIPTIONS", "FEATURES", "FEATURES_COLUMN", "FLOAT_FEATURES", "FOUNDATIONAL",
    "INT_FEATURES", "QUANTIZE_MODES", "TAGS_COLUMN", "PerturbationError", "Quantizer", "Token", "add_control_tags",
    "add_features", "build_preamble", "check_candidates", "compose_input", "consistency_violations",
    "count_syllables", "derive_features", "evaluate", "extract_features", "feature_stds", "features_from_tokens",
    "fit_quantizer", "fkre", "format_table", "format_tags", "format_value", "get_backend", "mctune_stage",
    "parse_tags", "perturb_features", "read_pairs", "resolve_tolerance", "row_features", "run_eval",
    "sample_tags", "tag_met", "tag_values", "write_report",
]
