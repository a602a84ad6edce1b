"""Retrieval over a held-out set: recall at k both ways, from scikit-learn's top-k accuracy."""

from __future__ import annotations

import pytest
import torch

from hlip_ray.eval.held_out import retrieval_report


def test_recall_at_k_both_ways_on_known_rankings():
    study = torch.eye(6)
    assert retrieval_report(study, study)["r@1"] == 1.0
    # Each report matches the next study better than its own: its own ranks second for every query.
    shifted = torch.roll(torch.eye(6), shifts=1, dims=0) + 0.5 * torch.eye(6)
    report = retrieval_report(study, torch.nn.functional.normalize(shifted, dim=1))
    assert report["study_to_report_r@1"] == 0.0 and report["report_to_study_r@1"] == 0.0
    assert report["study_to_report_r@5"] == 1.0 and report["r@5"] == 1.0
    assert "r@10" not in report   # a k of the set's size or more counts every query: left out


def test_one_way_can_differ_from_the_other():
    study = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    report = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    found = retrieval_report(study, report, ks=(1,))
    # study -> report: study 1 is closest to reports 0 and 1 equally; report -> study: report 1 ranks study 0 first
    assert found["report_to_study_r@1"] == pytest.approx(2 / 3)
    assert found["r@1"] == pytest.approx((found["study_to_report_r@1"] + found["report_to_study_r@1"]) / 2)
