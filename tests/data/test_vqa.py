"""The VQA mini-benchmarks (questions, answers, captions) and the exact-match metric."""

import pytest

from mmtune.data.vqa import exact_match, normalize_answer, vqa_digits, vqa_shapes


def test_vqa_data_questions_answers_and_captions():
    digits = vqa_digits(num_samples=40)
    assert [len(digits[s]) for s in ("train", "val", "test")] == [24, 6, 10]
    ids = [it["id"] for s in digits.values() for it in s]
    assert len(set(ids)) == 40
    for it in digits["train"]:
        assert it["question"] == "Which digit is shown?" and it["answer"] in "0123456789"
        assert it["answer"] in it["caption"]
    shapes = vqa_shapes(num_samples=20)
    for it in shapes["train"] + shapes["test"]:
        assert it["question"] == "What colour is the square?"
        assert it["answer"] in ("red", "green", "blue", "yellow")
        assert it["caption"].count("square") == 1 and f"{it['answer']} square" in it["caption"]
        assert it["image"].shape == (112, 112, 3)
    assert vqa_shapes(num_samples=20)["test"][0]["caption"] == shapes["test"][0]["caption"]


def test_exact_match_normalisation():
    assert normalize_answer("  Red. ") == "red"
    assert exact_match(["7", "Seven", "red!"], ["7", "7", "Red"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        exact_match(["a", "b"], ["a"])
