"""``hlip-ray eval``'s figures: bootstrap intervals, thresholds, balanced accuracy and F1, the linear probe,
prompt templates, and the command end to end with its written report, its model run in a Ray actor
placed as a training worker (``eval.device``, ``resources.trainer``) with the figures of the driver-side path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score, roc_curve

from hlip_ray import cli
from hlip_ray.config import ConfigError, load_config
from hlip_ray.demo.synth import LABELS
from hlip_ray.eval import metrics
from hlip_ray.eval.metrics import bootstrap_auc, classification_report, linear_probe, youden_threshold
from hlip_ray.eval.zeroshot import label_prompts
from tests.helpers import synthetic_corpus, tiny_bert_dir, tiny_run_checkpoint

NAMES = ["a", "b"]


def noisy_scores(studies: int, seed: int, noise: float = 1.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two labels of ``studies`` studies (about half positive), each scored by its value plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((studies, 2)) < 0.5).astype(np.int8)
    scores = {name: labels[:, column] + noise * rng.standard_normal(studies) for column, name in enumerate(NAMES)}
    return scores, labels


def test_one_resample_scores_every_label_on_the_same_studies_as_scikit_learn_does():
    scores, labels = noisy_scores(30, seed=1)
    labels[3, 1] = -1   # a study without label b: left out for b only
    found = bootstrap_auc(scores, labels, NAMES, samples=1, seed=7)
    drawn = np.random.default_rng(7).integers(0, 30, size=30)
    expected = {}
    for column, name in enumerate(NAMES):
        picked = drawn[labels[drawn, column] >= 0]
        expected[name] = roc_auc_score(labels[picked, column], scores[name][picked])
        assert found["per_label"][name]["low"] == found["per_label"][name]["high"] == pytest.approx(expected[name])
    assert found["macro"]["low"] == pytest.approx(np.mean(list(expected.values())))
    assert found["level"] == 0.95 and found["samples"] == 1


def test_the_bootstrap_interval_covers_the_point_estimate_and_narrows_with_more_studies():
    widths = []
    for studies in (40, 400):
        scores, labels = noisy_scores(studies, seed=2)
        found = bootstrap_auc(scores, labels, NAMES, samples=100)
        for column, name in enumerate(NAMES):
            interval = found["per_label"][name]
            assert interval["low"] <= roc_auc_score(labels[:, column], scores[name]) <= interval["high"]
            assert interval["resamples"] == 100
        macro = np.mean([roc_auc_score(labels[:, column], scores[name]) for column, name in enumerate(NAMES)])
        assert found["macro"]["low"] <= macro <= found["macro"]["high"]
        widths.append(found["macro"]["high"] - found["macro"]["low"])
    assert widths[1] < widths[0] / 2, widths
    # the same seed, the same interval
    assert bootstrap_auc(scores, labels, NAMES, samples=100) == found


def test_resamples_with_one_class_of_a_label_are_skipped_for_it_and_for_the_macro_mean():
    scores, labels = noisy_scores(20, seed=3)
    labels[:, 1] = 0
    labels[0, 1] = 1   # b: one positive study, absent from about a third of the resamples
    found = bootstrap_auc(scores, labels, NAMES, samples=100)
    assert found["per_label"]["a"]["resamples"] == 100
    assert 45 < found["per_label"]["b"]["resamples"] < 85   # P(drawn) = 1 - (19/20)^20 = 0.64
    assert found["macro"]["resamples"] == found["per_label"]["b"]["resamples"]
    labels[0, 1] = 0   # b all negative: no point AUC, no interval
    assert set(bootstrap_auc(scores, labels, NAMES, samples=10)["per_label"]) == {"a"}


def test_the_youden_threshold_is_the_rocs_largest_tpr_minus_fpr():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    values = np.array([0, 0, 1, 0, 1, 1, 1])
    # >= 0.5: TPR 3/4, FPR 0 (J 0.75); >= 0.3: TPR 1, FPR 1/3 (J 0.67)
    assert youden_threshold(scores, values) == 0.5
    fpr, tpr, thresholds = roc_curve(values, scores)
    assert youden_threshold(scores, values) == thresholds[np.argmax(tpr - fpr)]
    # a useless score still gives a finite threshold (not roc_curve's +inf)
    assert np.isfinite(youden_threshold(np.zeros(4), np.array([0, 1, 0, 1])))


def test_a_threshold_chosen_on_another_split_is_applied_to_the_evaluated_one():
    chosen_scores = {"a": np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])}
    chosen_labels = np.array([[0], [0], [1], [0], [1], [1], [1]], dtype=np.int8)
    scores = {"a": np.array([0.05, 0.35, 0.45, 0.55, 0.65, 0.2])}
    labels = np.array([[0], [1], [1], [1], [1], [0]], dtype=np.int8)
    found = classification_report(scores, labels, ["a"], chosen_scores, chosen_labels, chosen_on="val")
    assert found["threshold"] == {"chosen_on": "val", "rule": "youden", "per_label": {"a": 0.5}}
    predicted = (scores["a"] >= 0.5).astype(int)   # [0, 0, 0, 1, 1, 0]: two positives missed
    assert found["per_label"]["a"] == {
        "balanced_accuracy": pytest.approx(balanced_accuracy_score(labels[:, 0], predicted)),
        "f1": pytest.approx(f1_score(labels[:, 0], predicted))}
    assert found["macro_balanced_accuracy"] == pytest.approx(0.75) and found["macro_f1"] == pytest.approx(2 / 3)
    # chosen on the evaluated split itself, the threshold separates it perfectly
    own = classification_report(scores, labels, ["a"], scores, labels, chosen_on="test")
    assert own["threshold"]["per_label"]["a"] == 0.35 and own["per_label"]["a"]["balanced_accuracy"] == 1.0
    one_class = classification_report(scores, labels, ["a"], chosen_scores, np.zeros_like(chosen_labels), "val")
    assert one_class["per_label"] == {} and "split 'val' has 0 positive and 7 negative" in one_class["skipped"]["a"]


def test_the_linear_probe_beats_chance_where_the_embeddings_carry_the_labels_and_skips_rare_labels():
    """Features whose signal is real by construction: 16-d embeddings of 60 studies, each label adding its
    own direction (half a noise standard deviation per axis) where present, as an encoder that learnt the
    findings would; the same embeddings with the labels shuffled carry none. A label with too few
    positives for the folds is skipped, with why."""
    rng = np.random.default_rng(5)
    labels = (rng.random((60, 3)) < 0.4).astype(np.int8)
    embeddings = labels @ rng.standard_normal((3, 16)) * 0.5 + rng.standard_normal((60, 16))
    rare = np.zeros((60, 1), dtype=np.int8)
    rare[:3] = 1
    found = linear_probe(embeddings, np.concatenate([labels, rare], axis=1), [*LABELS, "rare"], folds=4)
    assert set(found["per_label"]) == set(LABELS) and found["folds"] == 4
    assert all(auc > 0.75 for auc in found["per_label"].values()), found
    assert found["macro_auc"] == pytest.approx(np.mean(list(found["per_label"].values())))
    assert found["skipped"] == {
        "rare": "3 positive and 57 negative studies: fewer than eval.probe_folds (4) of one class"}
    shuffled = linear_probe(embeddings, rng.permutation(labels), list(LABELS), folds=4)
    assert abs(shuffled["macro_auc"] - 0.5) < 0.15 and shuffled["macro_auc"] < found["macro_auc"] - 0.25, shuffled


def test_the_few_shot_probe_learns_more_from_more_studies_per_class_and_repeats_its_draws():
    """The linear probe's embeddings of 120 studies: with k studies of each class the probe's AUC on the rest
    rises with k and its spread over the draws narrows; the same seed gives the same figures; a label with
    no more than k studies of one class is skipped for that k only."""
    rng = np.random.default_rng(6)
    labels = (rng.random((120, 2)) < 0.4).astype(np.int8)
    embeddings = labels @ rng.standard_normal((2, 16)) * 0.8 + rng.standard_normal((120, 16))
    rare = np.zeros((120, 1), dtype=np.int8)
    rare[:5] = 1
    rare[-1] = -1                                                   # a study without the label
    table = np.concatenate([labels, rare], axis=1)
    found = metrics.few_shot_probe(embeddings, table, ["a", "b", "rare"], [1, 5, 16], draws=12)
    assert found["draws"] == 12 and list(found["per_k"]) == [1, 5, 16]
    one, sixteen = found["per_k"][1], found["per_k"][16]
    for label in ("a", "b"):
        assert sixteen["per_label"][label]["mean"] > 0.8 > one["per_label"][label]["mean"] > 0.5
        spread = {k: found["per_k"][k]["per_label"][label] for k in (1, 16)}
        assert spread[16]["high"] - spread[16]["low"] < spread[1]["high"] - spread[1]["low"]
        assert spread[16]["low"] <= spread[16]["mean"] <= spread[16]["high"]
    assert set(one["per_label"]) == {"a", "b", "rare"} and one["skipped"] == {}
    for k in (5, 16):
        assert found["per_k"][k]["skipped"] == {
            "rare": f"5 positive and 114 negative studies: needs more than {k} of each class"}
    per_label = sixteen["per_label"]
    assert sixteen["macro"]["mean"] == pytest.approx(np.mean([per_label[name]["mean"] for name in ("a", "b")]))
    assert metrics.few_shot_probe(embeddings, table, ["a", "b", "rare"], [1, 5, 16], draws=12) == found
    shuffled = metrics.few_shot_probe(embeddings, rng.permutation(labels), ["a", "b"], [16], draws=12)
    assert abs(shuffled["per_k"][16]["macro"]["mean"] - 0.5) < 0.1


VOCABULARY_AB = {"bleed": {"positive": ["acute bleed."], "negative": ["no bleed"]},
                 "mass": {"positive": ["a mass"], "negative": ["no mass"]}}


def test_the_default_template_gives_the_bare_phrase_prompts_and_templates_add_their_own():
    assert label_prompts(VOCABULARY_AB, "bleed", "positive") == ["Acute bleed. No mass.", "Acute bleed. A mass."]
    templated = label_prompts(VOCABULARY_AB, "bleed", "negative", ["This study shows: {finding}.", "{finding}."])
    assert templated == ["This study shows: no bleed. No mass.", "This study shows: no bleed. A mass.",
                         "No bleed. No mass.", "No bleed. A mass."]
    assert load_config(None, []).eval.templates == ["{finding}."]


def test_a_template_without_the_finding_fails_at_config_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"eval\.templates: template 'This study shows: a finding\.' does not "
                                          r"contain \{finding\}"):
        load_config(None, ['eval.templates=["This study shows: a finding."]'])
    with pytest.raises(ConfigError, match=r"eval\.templates: at least one template"):
        load_config(None, ["eval.templates=[]"])


EVAL_OPTIONS = ["eval.threshold_split=train", "eval.bootstrap_samples=100", "eval.probe_folds=2", "eval.few_shot=[1,2]",
                'eval.templates=["This study shows: {finding}."]']


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, ray_session):
    """One ``hlip-ray eval`` of a tiny random model on 16 synthetic studies (thresholds chosen on the train
    split, relevance maps drawn), its encoder asking for the test cluster's ``trainer`` slots: the folders,
    what it printed for a person (stderr, with ``--json``), its result (stdout's one line), and where the encoder
    actor ran (its ``where()``, its placement)."""
    import contextlib
    import io

    from hlip_ray.eval import evaluate

    tmp_path = tmp_path_factory.mktemp("eval")
    corpus = synthetic_corpus(tmp_path / "corpus", studies=16, seed=4, val_fraction=0.5)
    checkpoint, _ = tiny_run_checkpoint(tmp_path / "checkpoint", tiny_bert_dir(tmp_path))
    out = tmp_path / "report"
    encoders = []
    stop = evaluate.SplitEncoder.stop

    def recorded_stop(encoder):
        encoders.append({"where": encoder.where(), "placement": encoder.placement})
        stop(encoder)

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setattr(evaluate.SplitEncoder, "stop", recorded_stop)
        assert cli.main(["eval", "--checkpoint", str(checkpoint), "--manifest", str(corpus / "manifest.parquet"),
                         "--out", str(out), "--interpret", str(tmp_path / "maps"),
                         f"eval.vocabulary={corpus / 'raw' / 'vocabulary.json'}", "resources.trainer=trainer",
                         "--json", *EVAL_OPTIONS]) == 0
    assert len(stdout.getvalue().splitlines()) == 1, stdout.getvalue()[-3000:]
    return {"corpus": corpus, "checkpoint": checkpoint, "out": out, "maps": tmp_path / "maps",
            "printed": stderr.getvalue().strip().splitlines(), "report": json.loads(stdout.getvalue()),
            "encoders": encoders}


def test_eval_command_writes_the_report_with_intervals_thresholds_and_probe(eval_run):
    """The figures' structure end to end (a random model's figures are near chance), and report.md,
    report.json and the ROC figure written to --out."""
    corpus, checkpoint, out, printed, report = (eval_run[key] for key in ("corpus", "checkpoint", "out", "printed",
                                                                          "report"))
    assert report["split"] == "val" and report["checkpoint"] == str(checkpoint)
    assert set(report) >= {"studies", "macro_auc", "per_label", "baseline", "loss", "retrieval", "auc_ci",
                           "classification", "linear_probe", "few_shot"}
    assert set(report["per_label"]) == set(LABELS) and report["auc_ci"]["samples"] == 100
    assert report["classification"]["threshold"]["chosen_on"] == "train"
    assert set(report["linear_probe"]["per_label"]) | set(report["linear_probe"]["skipped"]) == set(LABELS)
    few_shot = report["few_shot"]   # eval.few_shot=[1, 2]: 8 studies, about half of each class per label
    assert list(few_shot["per_k"]) == ["1", "2"] and few_shot["draws"] == 20
    for shots in few_shot["per_k"].values():
        assert set(shots["per_label"]) | set(shots["skipped"]) == set(LABELS)
    assert any(line.startswith("| few-shot probe AUC | k = 1 | k = 2 |") for line in printed)
    assert any(line.startswith("| label | zero-shot AUC | 95% CI |") for line in printed)
    assert json.dumps(json.loads((out / "report.json").read_text())) == json.dumps(report)   # NaN != NaN
    assert "| **macro** |" in (out / "report.md").read_text()
    assert (out / "roc_curves.png").read_bytes().startswith(b"\x89PNG")
    # --interpret: a relevance figure of every study for each label it is positive for
    val = set(_split_studies(corpus, "val"))
    rows = [json.loads(line) for line in (corpus / "raw" / "labels.jsonl").read_text().splitlines()]
    positives = sum(sum(row["labels"].values()) for row in rows if row["study_id"] in val)
    assert report["relevance_maps"]["figures"] == len(list(eval_run["maps"].glob("*.png"))) == positives > 0


def test_eval_encodes_in_an_actor_holding_a_trainer_slot_with_the_figures_of_the_driver_side_path(eval_run):
    """The model runs in one Ray actor, not in this (the driver's) process: it asks for what a training worker
    asks for (one CPU, one ``resources.trainer`` slot; no GPU here, so ``eval.device=auto`` is the CPU), and
    every forward pass (both splits, class embeddings, relevance maps) runs there. Its figures are those of
    the same model encoding the same stream in this process, as ``hlip-ray eval`` did before (abs 1e-6)."""
    import os

    from hlip_ray.config import apply_overrides
    from hlip_ray.data.sources import study_items
    from hlip_ray.data.streams import collate_study_batch, evaluation_stream
    from hlip_ray.eval.held_out import evaluate
    from hlip_ray.eval.zeroshot import load_vocabulary
    from hlip_ray.inference.trained_model import load_model
    from hlip_ray.run_checkpoint import read_config
    from hlip_ray.storage import Storage
    from hlip_ray.text_source import load_tokenizer

    (encoder,) = eval_run["encoders"]
    assert encoder["where"]["pid"] != os.getpid() and encoder["where"]["device"] == "cpu"
    assert encoder["placement"].options() == {"num_cpus": 1, "num_gpus": 0.0, "resources": {"trainer": 1.0}}
    assert encoder["where"]["resources"] == {"CPU": 1.0, "trainer": 1.0}   # as Ray assigned them
    report = eval_run["report"]

    corpus, checkpoint = eval_run["corpus"], eval_run["checkpoint"]
    model, _ = load_model(str(checkpoint), Storage())
    config = apply_overrides(read_config(str(checkpoint), Storage()),
                             [f"data.manifest={corpus / 'manifest.parquet'}", *EVAL_OPTIONS], str(checkpoint))
    items, source = study_items(config, Storage(), None, "val", train=False)
    batches = evaluation_stream(items, source, config).iter_torch_batches(
        batch_size=config.eval.batch_size, collate_fn=collate_study_batch)
    vocabulary = load_vocabulary((corpus / "raw" / "vocabulary.json").read_text())
    here = evaluate(model.eval(), batches, vocabulary=vocabulary,
                    tokenizer=load_tokenizer(config.model.text.name_or_path),
                    context_length=config.model.text.context_length, templates=config.eval.templates)
    assert here["studies"] == report["studies"] and here["loss"] == pytest.approx(report["loss"], abs=1e-6)
    assert here["macro_auc"] == pytest.approx(report["macro_auc"], abs=1e-6)
    for label in LABELS:
        assert here["per_label"][label] == pytest.approx(report["per_label"][label], abs=1e-6, nan_ok=True)
        assert here["baseline"]["per_label"][label] == pytest.approx(report["baseline"]["per_label"][label],
                                                                     abs=1e-6, nan_ok=True)
    assert here["retrieval"] == pytest.approx(report["retrieval"], abs=1e-6)


def test_eval_asked_for_cuda_on_a_cluster_without_a_gpu_fails_naming_the_key_before_the_model_loads(
        eval_run, capsys, monkeypatch):
    """``eval.device=cuda`` where Ray has no GPU: a ConfigError naming ``eval.device``, before any model loads
    (and so before any decoding); ``resources.trainer`` that no node of the local cluster has: the same,
    naming ``resources.trainer``, rather than an actor that waits forever."""
    import torch

    from hlip_ray.inference import trained_model

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    loads = []
    monkeypatch.setattr(trained_model, "load_model", lambda *args, **kwargs: loads.append(args))
    command = ["eval", "--checkpoint", str(eval_run["checkpoint"]), "--manifest",
               str(eval_run["corpus"] / "manifest.parquet")]
    assert cli.main([*command, "eval.device=cuda"]) == 3
    assert "eval.device=cuda" in capsys.readouterr().err
    assert cli.main([*command, "resources.trainer=gpu_pool"]) == 3
    assert "resources.trainer=gpu_pool" in capsys.readouterr().err
    assert not loads


def _split_studies(corpus, split: str) -> list[str]:
    from hlip_ray.data.manifest import read_manifest
    from hlip_ray.storage import Storage

    return [row.study_id for row in read_manifest(str(corpus / "manifest.parquet"), Storage()) if row.split == split]
