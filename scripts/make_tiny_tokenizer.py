"""Regenerates trainers/assets/tiny_tokenizer.json (the tiny model's tokenizer) from the bundled corpus.

Run only when data/bundled.py's vocabulary changes; the file is committed so that every process and machine
uses the same vocabulary (BPE training itself is not deterministic).
"""

from tunelab.trainers.models import TINY_TOKENIZER, train_tiny_tokenizer

if __name__ == "__main__":
    train_tiny_tokenizer(512).save(TINY_TOKENIZER)
    print(f"wrote {TINY_TOKENIZER}")
