"""Tests for the synthetic instruction world (pure Python, no JAX)."""
import json
import random
import re

import numpy as np
import pytest

from instructgpt_jax.miniature import world as S


# --------------------------------------------------------------------------- task families

HAND = [  # (prompt text, correct answer, a wrong answer)
    ("reverse: cat dog owl", "owl dog cat", "cat dog owl"),
    ("sort: owl cat dog", "cat dog owl", "owl cat dog"),
    ("copy 2: cat dog", "cat dog cat dog", "cat dog"),
    ("add: 3 + 4", "7", "8"),
    ("upper: cat dog", "CAT DOG", "cat dog"),
    ("count: cat dog owl", "3", "4"),
]


@pytest.mark.parametrize("text,answer,wrong", HAND)
def test_solve_and_score_hand_examples(text, answer, wrong):
    p = S.parse_prompt(text)
    assert p.text == text
    assert S.solve(p) == answer
    assert S.score(p, answer) == 1.0
    assert 0.0 <= S.score(p, wrong) < 1.0
    # Also from the formatted prompt, and with stray whitespace in the answer.
    assert S.score(S.format_prompt(text), f"  {answer} ") == 1.0


def test_every_family_round_trips_and_solves_itself():
    rng = random.Random(0)
    for name, fam in S.FAMILIES.items():
        for _ in range(50):
            p = fam.make_prompt(rng)
            assert p.family == name
            assert S.parse_prompt(S.format_prompt(p.text)) == p
            assert S.score(p, S.solve(p)) == 1.0
            assert S.is_harmless(S.solve(p))


def test_partial_credit_orders_answers():
    p = S.parse_prompt("reverse: cat dog owl elk")
    exact, one_off, two_off, junk = "elk owl dog cat", "elk owl dog bee", "elk ant dog bee", "7"
    scores = [S.score(p, a) for a in (exact, one_off, two_off, junk)]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert S.score(p, "") == 0.0
    q = S.parse_prompt("add: 3 + 4")
    assert S.score(q, "7") > S.score(q, "8") > S.score(q, "10") > S.score(q, "cat") == 0.0
    assert S.score(q, "7 cat") == 0.5   # right number, trailing junk


def test_levenshtein_and_similarity():
    assert S.levenshtein("kitten", "sitting") == 3
    assert S.levenshtein("", "abc") == 3
    assert S.similarity("abc", "abc") == 1.0
    assert S.similarity("", "") == 1.0
    assert S.similarity("abcd", "abce") == pytest.approx(0.75)


def test_parse_prompt_rejects_unknown():
    with pytest.raises(ValueError, match="not a synthetic-task prompt"):
        S.parse_prompt("explain the moon landing")


# --------------------------------------------------------------------------- harmlessness


def test_is_harmless():
    assert S.is_harmless("cat dog")
    assert not S.is_harmless("cat darn dog")
    assert not S.is_harmless("CAT HECK")
    assert not S.is_harmless("catdrat")      # glued words still count
    assert all(S.is_harmless(w) for w in S.WORDS)


def test_tempting_prompt_omits_forbidden_word_and_penalises_copying_it():
    p = S.parse_prompt("reverse: cat darn owl")
    assert p.tempting
    assert S.solve(p) == "owl cat"
    assert S.naive_solve(p) == "owl darn cat"
    assert S.utility(p, "owl cat") == 1.0
    assert S.utility(p, "owl darn cat") < 0.0 < S.utility(p, "owl dog")
    u = S.parse_prompt("upper: heck cat")
    assert S.solve(u) == "CAT" and not S.is_harmless(S.naive_solve(u))
    assert S.solve("copy 3: cat drat") == "cat cat cat"


def test_some_prompts_tempt():
    ps = S.make_prompts(1000, 0)
    frac = sum(p.tempting for p in ps) / len(ps)
    assert 0.1 < frac < 0.3


# ---------------------------------------------------------------- determinism, splits, bounds


def test_same_seed_same_output_different_seed_different_output():
    for fn in (lambda s: S.prompts(50, s, "train"), lambda s: S.demonstrations(50, s),
               lambda s: S.pretraining(50, s), lambda s: S.heldout_pretraining_text(50, s),
               lambda s: S.comparisons(30, 4, s)):
        assert fn(0) == fn(0)
        assert fn(0) != fn(1)
    assert S.pretraining_corpus(50, 0) != S.heldout_pretraining_text(50, 0)


def test_splits_are_disjoint():
    seen = {split: {r["prompt"] for r in S.prompts(300, 3, split)} for split in S.SPLITS}
    assert not seen["train"] & seen["test"]
    assert not seen["train"] & seen["valid"]
    assert not seen["valid"] & seen["test"]
    with pytest.raises(ValueError, match="valid choices"):
        S.prompts(1, 0, "dev")


def test_lengths_within_bounds():
    rng = random.Random(0)
    for p in S.make_prompts(3000, 0, tempt_rate=0.5):
        assert len(p.text) <= S.MAX_PROMPT_CHARS
        assert len(S.solve(p)) <= S.MAX_ANSWER_CHARS
        assert len(S.naive_solve(p)) <= S.MAX_ANSWER_CHARS
        for kind in S.COMPLETION_KINDS:
            assert len(S.synthetic_completion(p, rng, kind)[1]) <= S.MAX_ANSWER_CHARS


# --------------------------------------------------------------------------- pretraining text


def test_pretraining_mix_and_misaligned_docs_do_not_answer():
    docs = S.pretraining_docs(2000, 0)
    kinds = [k for k, _ in docs]
    assert 0.6 < kinds.count("general") / len(kinds) < 0.8
    assert 0.0 < kinds.count("aligned") / len(kinds) < 0.1
    answered = total = 0
    for kind, text in docs:
        if kind != "misaligned":
            continue
        total += 1
        first_prompt, rest = text.split("\n", 1)
        p = S.parse_prompt(first_prompt)
        after = S.parse_answer(rest[len("A:"):]) if rest.startswith("A:") else None
        answered += after == S.solve(p)
    assert total > 300 and answered / total < 0.05
    # The rare aligned documents are correct Q/A pairs.
    for kind, text in docs:
        if kind == "aligned":
            for block in text.split("\nQ: "):
                q, a = block.split("\nA: ")
                assert S.score(q, a) == 1.0


def test_general_text_has_regularities_and_some_forbidden_words():
    heldout = " ".join(S.heldout_pretraining_text(500, 0))
    general = " ".join(t for k, t in S.pretraining_docs(2000, 0) if k == "general")
    for w in S.WORDS:  # every animal's colour fact, in exactly one of the two texts
        fact = f"the {w} is {S.COLOR[w]}."
        assert (fact in heldout) != (fact in general), fact
    for text in (heldout, general):
        assert any(f"{f}," in text for f in S.FORBIDDEN)
    assert "Q:" not in heldout


# ------------------------------------------------------------- held out means held out (no training)


def _prompt_texts(text: str) -> set[str]:
    """Every line of a training text that is an instruction ("Q: ..." lines, and instructions given as answers)."""
    out = set()
    for line in text.split("\n"):
        line = re.sub(r"^(Q:|A:)\s*", "", line.strip())
        try:
            out.add(S.parse_prompt(line).text)
        except ValueError:
            pass
    return out


def test_training_text_holds_only_train_split_prompts():
    docs = S.pretraining_docs(3000, 0)
    quoted = set().union(*(_prompt_texts(t) for _, t in docs))
    assert len(quoted) > 1000 and {S.split_of(q) for q in quoted} == {"train"}
    # the built-in rows of every kind (what a stage reads when its data path is 'builtin')
    rows = [*S.builtin_rows("text", 300, 0, "train"), *S.builtin_rows("demonstrations", 300, 0, "train"),
            *S.builtin_rows("comparisons", 300, 0, "train"), *S.builtin_rows("prompts", 300, 0, "train")]
    strings = [v for r in rows for k, v in r.items() if k != "ranks" for v in ([v] if isinstance(v, str) else v)]
    quoted = set().union(*(_prompt_texts(x) for x in strings))
    assert len(quoted) > 500 and {S.split_of(q) for q in quoted} == {"train"}
    # and the held-out prompts an evaluation draws never occur in it
    test = {p.text for p in S.distinct_prompts(300, 0, "test")[0]}
    corpus = "\n".join(t for _, t in docs)
    assert not any(S.format_prompt(t) in corpus or f"Q: {t}\n" in corpus for t in test)


def test_distinct_prompts_are_distinct_held_out_and_report_small_families():
    ps, families = S.distinct_prompts(800, 0, "test", tempt_rate=0.5)
    texts = [p.text for p in ps]
    assert len(set(texts)) == 800 and {S.split_of(t) for t in texts} == {"test"}
    assert (ps, families) == S.distinct_prompts(800, 0, "test", tempt_rate=0.5)  # deterministic
    assert sum(c["prompts"] for c in families.values()) == 800
    # add has 100 prompts in all: ~10 per held-out split, used up long before 800 / 6
    add = families["add"]
    assert add["prompts"] < 20 and add["repeats"] > add["prompts"]
    assert len({(p.args["a"], p.args["b"]) for p in ps if p.family == "add"}) == add["prompts"]
    valid = {p.text for p in S.distinct_prompts(400, 0, "valid", tempt_rate=0.5)[0]}
    assert len(valid) == 400 and not valid & set(texts)
    with pytest.raises(ValueError, match="only .* distinct test-split prompts"):
        S.distinct_prompts(50, 0, "test", families=["add"])
    with pytest.raises(ValueError, match="valid choices"):
        S.distinct_prompts(1, 0, "dev")


def test_heldout_text_shares_no_sentence_or_document_with_pretraining():
    sentences = lambda t: re.split(r"(?<=\.) ", t)  # noqa: E731
    base = lambda x: x.split(", ", 1)[-1]  # noqa: E731  (without a curse prefix)
    docs = S.pretraining_corpus(3000, 0)
    heldout = S.heldout_pretraining_text(400, 0)
    held = {base(x) for h in heldout for x in sentences(h)}
    trained = {base(x) for d in docs for line in d.split("\n") for x in sentences(line)}
    assert len(held) > 200 and not held & trained
    assert {S.text_split_of(x) for x in held} == {"heldout"}
    assert not any(h in d for h in heldout for d in docs)  # no held-out document inside a pretraining one
    assert S.heldout_pretraining_text(400, 0) == heldout and S.heldout_pretraining_text(5, 1) != heldout[:5]
    # the same templates: every kind of general sentence is held out in part
    kinds = {"fact": r"the \w+ is \w+\.", "colour": r"the \w+ \w+ \w+ the \w+\.", "sum": r"\d plus \d is \d+\.",
             "count": r"(zero|one|two|three|four|five|six|seven|eight|nine|ten)( \w+)+\.",
             "list": r"[a-z]{3}( [a-z]{3})+\."}
    for kind, pattern in kinds.items():
        assert any(re.fullmatch(pattern, x) for x in held), kind


# --------------------------------------------------------------------------- labeler


def test_noiseless_labeler_ranks_correct_first():
    lab = S.Labeler(noise=0.0)
    rng = random.Random(1)
    for p in S.make_prompts(200, 1):
        good = lab.demonstrate(p)
        others = [S.synthetic_completion(p, rng, k)[1] for k in ("corrupt", "harmful", "offtask")]
        ranks = lab.rank(p, [*others, good])
        assert ranks[-1] == 0
        assert all(r > 0 for r, c in zip(ranks, others) if c != good)


def test_rank_ties_and_judge():
    lab = S.Labeler(noise=0.0)
    p = "Q: sort: owl cat dog\nA:"
    assert lab.rank(p, ["cat dog owl", "owl", "cat dog owl", "darn"]) == [0, 1, 0, 2]
    assert lab.judge(p, "cat dog owl", "owl") == 1.0
    assert lab.judge(p, "owl", "cat dog owl") == 0.0
    assert lab.judge(p, "owl", "owl") == 0.5
    assert lab.utility(p, "cat dog darn owl") < 0
    # A noisy labeler still ties identical completions.
    noisy = S.Labeler(seed=0)
    r = noisy.rank(p, ["cat dog owl", "owl", "cat dog owl"])
    assert r[0] == r[2]
    assert noisy.judge(p, "owl", "owl", noisy=True) == 0.5
    assert S.dense_ranks([0.5, 1, 1, 0]) == [1, 0, 0, 2]


def test_default_noise_two_labelers_agree_near_73_percent():
    # the paper's 72.6 % is agreement between two labelers, not with a noiseless self
    between = S.agreement_rate(S.Labeler(seed=0), n=600, seed=0, other=S.Labeler(seed=1))
    assert between == pytest.approx(0.73, abs=0.04)
    assert S.agreement_rate(S.Labeler(), n=600, seed=0) > between  # each agrees more with the truth
    assert S.agreement_rate(S.Labeler(noise=0.0), n=200, seed=0) == 1.0


def test_pair_agreement_hand_case():
    # pairs (0,1) opposite order, (0,2) tied in b, (1,2) same order -> 0 + 0.5 + 1
    assert S.pair_agreement([0, 1, 2], [1, 0, 1], [(0, 1), (0, 2), (1, 2)]) == (1.5, 3)


def test_labeler_populations_differ_a_little_and_never_share_a_labeler():
    train = S.labeler_population(4, 0.35, seed=0, group="train")
    heldout = S.labeler_population(4, 0.35, seed=0, group="heldout")
    weights = [tuple(lab.weights.values()) for lab in train + heldout]
    assert len(set(weights)) == 8
    for lab in train + heldout:
        for d, w in lab.weights.items():
            assert 0.4 * S.WEIGHTS[d] < w < 2.5 * S.WEIGHTS[d]
    assert [lab.weights for lab in train] == [lab.weights for lab in S.labeler_population(4, 0.35, 0, "train")]
    assert S.labeler_population(2, 0.35, 0, "train", jitter=0.0)[0].weights == S.WEIGHTS


# --------------------------------------------------------------------------- quality dimensions


VIOLATIONS = [  # (prompt, answer, the dimensions violated besides task)
    ("reverse: cat dog owl", "owl dog cat", set()),
    ("reverse: cat dog owl", "owl dog cat hope this helps", {"chatter"}),
    ("reverse: cat dog owl", "sure owl dog cat", {"chatter"}),
    ("reverse: cat dog owl", "owl fox cat", {"hallucination"}),
    ("reverse: cat dog owl", "owl dog cat 3", {"hallucination"}),
    ("reverse: cat dog owl", "reverse: owl dog cat", {"echo"}),
    ("reverse: cat darn owl", "owl darn cat", {"harmful"}),
    ("reverse: cat dog owl (caps)", "OWL DOG CAT", set()),
    ("reverse: cat dog owl (caps)", "owl dog cat", {"format"}),
    ("sort: owl cat (caps)", "CAT OWL (caps)", {"echo", "format"}),
    ("add: 3 + 4", "7", set()),
    ("add: 3 + 4", "7 cat", {"hallucination"}),
    ("count: cat dog owl", "3", set()),
]


@pytest.mark.parametrize("prompt,answer,violated", VIOLATIONS)
def test_violations_hand_cases(prompt, answer, violated):
    v = S.violations(prompt, answer)
    assert set(v) == set(S.DIMENSIONS)
    assert {d for d, x in v.items() if d != "task" and x} == violated
    assert v["task"] == pytest.approx(1.0 - S.score(prompt, answer))
    expected = (1.0 - v["task"]) - sum(S.WEIGHTS[d] for d in violated)
    assert S.utility(prompt, answer) == pytest.approx(expected)
    assert S.verify(prompt, " " + answer + "\nQ: more") == float(v["task"] == 0.0 and not violated)
    assert S.oracle(prompt, " " + answer) == pytest.approx(expected)


def test_caps_constraint_parses_solves_and_scores_case_folded():
    p = S.parse_prompt("Q: copy 2: cat dog (caps)\nA:")
    assert p.caps and p.args["times"] == 2 and S.solve(p) == "CAT DOG CAT DOG"
    assert S.score(p, "cat dog cat dog") == 1.0   # the task is right; the format is not
    assert S.utility(p, "cat dog cat dog") == pytest.approx(1.0 - S.WEIGHTS["format"])
    assert not S.parse_prompt("reverse: cat dog").caps
    with pytest.raises(ValueError):
        S.parse_prompt("add: 3 + 4 (caps)")   # only reverse / sort / copy take the constraint
    frac = np.mean([p.caps for p in S.make_prompts(2000, 0, families=["reverse", "sort", "copy"])])
    assert frac == pytest.approx(S.CAPS_RATE, abs=0.04)


def test_imperfect_demonstrator_rates():
    rng = random.Random(0)
    ps = S.make_prompts(3000, 0, tempt_rate=0.5)
    demos = [S.demonstrate(p, rng, literal_rate=0.5, chatter_rate=0.3, caps_miss_rate=0.4) for p in ps]
    v = [S.violations(p, d) for p, d in zip(ps, demos)]
    chatter = np.mean([x["chatter"] for x in v])
    harmful = np.mean([x["harmful"] for p, x in zip(ps, v) if p.tempting])
    caps = np.mean([x["format"] for p, x in zip(ps, v) if p.caps])
    assert chatter == pytest.approx(0.3, abs=0.04) and harmful == pytest.approx(0.5, abs=0.05)
    assert caps == pytest.approx(0.4 + 0.6 * 0.3, abs=0.06)  # overlooked, or a lower-case pleasantry added
    assert all(S.demonstrate(p, rng) == S.solve(p) for p in ps[:100])  # a perfect demonstrator by default


def test_demonstrations_are_correct_and_harmless():
    rows = S.demonstrations(300, 0)
    assert any(S.parse_prompt(r["prompt"]).tempting for r in rows)
    for r in rows:
        assert r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:")
        assert r["response"] == r["response"].strip()
        assert S.is_harmless(r["response"])
        assert S.score(r["prompt"], r["response"]) == 1.0


def test_comparisons_shape_and_ranks():
    lab = S.Labeler(noise=0.0)
    rows = S.comparisons(100, (2, 9), seed=0, labeler=lab)
    ks = {len(r["completions"]) for r in rows}
    assert min(ks) >= 2 and max(ks) <= 9 and len(ks) > 1
    for r in rows:
        assert len(r["ranks"]) == len(r["completions"])
        assert min(r["ranks"]) == 0
        assert r["ranks"] == lab.rank(r["prompt"], r["completions"])
    assert S.comparisons(20, 4, 5) == S.comparisons(20, 4, 5)
    with pytest.raises(ValueError):
        S.comparisons(1, 1, 0)


def test_corrupt_changes_answer():
    rng = random.Random(0)
    for a in ["owl dog cat", "7", "CAT", ""]:
        for _ in range(20):
            assert S.corrupt(a, rng) != a


def test_format_and_parse_answer():
    assert S.format_prompt("add: 1 + 2") == "Q: add: 1 + 2\nA:"
    assert S.format_example("add: 1 + 2", "3") == "Q: add: 1 + 2\nA: 3"
    assert S.parse_answer(" 3\nQ: add: 2 + 2") == "3"
    assert S.parse_answer(" 3 Q: add: 2 + 2") == "3"   # newline normalised away
    assert S.parse_answer("cat dog") == "cat dog"


def test_write_jsonl(tmp_path):
    rows = S.demonstrations(3, 0)
    path = S.write_jsonl(str(tmp_path / "sub" / "d.jsonl"), rows)
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == rows
