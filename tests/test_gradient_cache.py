"""The losses and the exact gradient cache: against direct formulas, a full-batch step, and DeepSpeed."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from hlip_ray.config import load_config
from hlip_ray.model import build_model
from hlip_ray.model.contrastive import clip_loss, contrastive_loss, siglip_loss
from hlip_ray.train.engine import lr_factor, parameter_groups
from hlip_ray.train.grad_cache import contrastive_step
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_bert_dir

BATCH = 16


def tiny_clip_config(text_dir, loss="clip", *extra):
    return load_config(None, [
        "data.grid=[16,32,32]", "model.patch_size=[8,16,16]", "model.embed_dim=24", "model.num_heads=2",
        "model.depth=3", "model.projection_dim=16", "model.max_scan_slots=8", "model.patch_dropout=0.3",
        "model.drop_path=0.2", f"model.loss={loss}", f"model.text.name_or_path={text_dir}",
        "model.text.context_length=12", "train.lr=1e-3", "train.warmup_steps=0", "train.max_steps=10",
        "train.weight_decay=0.1", "train.grad_clip=1000", "train.precision=fp32", "train.num_workers=2",
        f"train.global_batch_size={BATCH}", "train.chunk_size=2", *extra])


def study_batch(seed: int = 0, size: int = BATCH) -> dict[str, torch.Tensor]:
    """Studies of 1-3 real scans (padded to 3) with token ids and per-study seeds."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (size,), generator=gen)
    return {
        "pixels": torch.randint(0, 256, (size, 3, 1, 16, 32, 32), generator=gen, dtype=torch.uint8),
        "scan_mask": torch.arange(3)[None] < counts[:, None],
        "input_ids": torch.randint(1000, 5000, (size, 12), generator=gen),
        "attention_mask": (torch.arange(12)[None] < torch.randint(6, 13, (size, 1), generator=gen)).long(),
        "study_seeds": torch.randint(0, 2**62, (size,), generator=gen),
    }


def full_batch_loss(model, batch, kind, sentence_weight=0.0):
    """The loss of the whole batch in one forward; with a sentence weight, the dual loss."""
    out = model(**batch)
    loss = contrastive_loss(kind, out["study_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    if sentence_weight:
        loss = loss + sentence_weight * contrastive_loss(kind, out["study_features"], out["sentence_features"],
                                                         out["logit_scale"], out["logit_bias"])
    return loss


# -- losses --------------------------------------------------------------------------------
def test_clip_loss_matches_the_infonce_formula():
    gen = torch.Generator().manual_seed(1)
    study = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    report = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    scale = torch.tensor(7.0)
    total = 0.0
    for i in range(6):
        to_reports = [math.exp(scale * float(study[i] @ report[j])) for j in range(6)]
        to_studies = [math.exp(scale * float(study[j] @ report[i])) for j in range(6)]
        total += -math.log(to_reports[i] / sum(to_reports)) - math.log(to_studies[i] / sum(to_studies))
    assert clip_loss(study, report, scale).item() == pytest.approx(total / 12, rel=1e-5)


def test_siglip_loss_matches_the_pairwise_sigmoid_formula():
    gen = torch.Generator().manual_seed(2)
    study = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    report = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    total = 0.0
    for i in range(5):
        for j in range(5):
            logit = float(scale * (study[i] @ report[j]) + bias)
            label = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-label * logit))
    assert siglip_loss(study, report, scale, bias).item() == pytest.approx(total / 5, rel=1e-5)


def test_learning_rate_warms_up_then_follows_a_cosine():
    assert [lr_factor(step, 4, 14) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, 4, 14) == pytest.approx(0.5)
    assert lr_factor(14, 4, 14) == pytest.approx(0.0) and lr_factor(40, 4, 14) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_cls_and_logit_scale(tmp_path):
    model = build_model(tiny_clip_config(tiny_bert_dir(tmp_path)))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.cls_token", "visual.norm.weight", "visual.blocks.0.attn.qkv.bias"} <= no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert "visual.blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}


# -- the gradient cache in one process -----------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradient_cache_matches_a_full_batch_step(tmp_path, kind):
    config = tiny_clip_config(tiny_bert_dir(tmp_path, dropout=0.0), kind)
    torch.manual_seed(0)
    cached = build_model(config).train()
    full = copy.deepcopy(cached)
    batch = study_batch()
    result = contrastive_step(cached, lambda t: t.backward(), batch, loss=kind, chunk_size=3)
    loss = full_batch_loss(full, batch, kind)
    loss.backward()
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    scale = max(p.grad.abs().max().item() for p in full.parameters() if p.grad is not None)
    for (name, p), q in zip(cached.named_parameters(), full.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def with_sentences(batch: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    """The batch with one sentence's tokens per study (the dual loss), shorter than the reports."""
    gen = torch.Generator().manual_seed(seed)
    size = len(batch["pixels"])
    return {**batch, "sentence_input_ids": torch.randint(1000, 5000, (size, 12), generator=gen),
            "sentence_attention_mask": (torch.arange(12)[None] < torch.randint(3, 8, (size, 1), generator=gen)).long()}


@pytest.mark.parametrize(("kind", "frozen"), [("clip", False), ("siglip", False), ("clip", True)])
def test_gradient_cache_with_the_dual_loss_matches_a_full_batch_step(tmp_path, kind, frozen):
    """loss(study, report) + w * loss(study, sentence), in chunks, equals the full batch's."""
    config = tiny_clip_config(tiny_bert_dir(tmp_path, dropout=0.0), kind, f"model.text.frozen={frozen}",
                              "model.sentence_loss_weight=0.7")
    torch.manual_seed(0)
    cached = build_model(config).train()
    full = copy.deepcopy(cached)
    batch = with_sentences(study_batch(4))
    result = contrastive_step(cached, lambda t: t.backward(), batch, loss=kind, chunk_size=3, text_frozen=frozen,
                              sentence_weight=0.7)
    loss = full_batch_loss(full, batch, kind, 0.7)
    loss.backward()
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    report_only = full_batch_loss(copy.deepcopy(full), batch, kind).item()
    assert abs(result.loss - report_only) > 1e-3   # the sentence term is in the loss
    scale = max(p.grad.abs().max().item() for p in full.parameters() if p.grad is not None)
    for (name, p), q in zip(cached.named_parameters(), full.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_the_dual_loss_without_sentences_is_refused(tmp_path):
    model = build_model(tiny_clip_config(tiny_bert_dir(tmp_path))).train()
    with pytest.raises(ValueError, match="sentence_input_ids"):
        contrastive_step(model, lambda t: t.backward(), study_batch(), loss="clip", chunk_size=4, sentence_weight=0.5)


def test_text_dropout_is_replayed_from_each_chunks_rng_state(tmp_path):
    """With dropout in the text tower the cached step equals the same chunks forwarded with grad."""
    config = tiny_clip_config(tiny_bert_dir(tmp_path, dropout=0.3))
    torch.manual_seed(0)
    cached = build_model(config).train()
    reference = copy.deepcopy(cached)
    batch = study_batch(3)
    torch.manual_seed(123)
    contrastive_step(cached, lambda t: t.backward(), batch, loss="clip", chunk_size=4)
    rng_after_step = torch.get_rng_state()
    torch.manual_seed(123)  # the same RNG stream, chunk by chunk, with grad
    outs = [reference(**{k: v[i : i + 4] for k, v in batch.items()}) for i in range(0, BATCH, 4)]
    loss = contrastive_loss("clip", torch.cat([o["study_features"] for o in outs]),
                            torch.cat([o["text_features"] for o in outs]), outs[0]["logit_scale"])
    loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in cached.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4, msg=name)
    # the RNG ends where the chunks forwarded once leave it, so the next step draws the same
    assert torch.equal(rng_after_step, torch.get_rng_state())
    # and the replay matters: without it the text tower's gradient differs
    torch.manual_seed(0)
    unreplayed = build_model(config).train()
    torch.manual_seed(123)
    with torch.no_grad():
        unreplayed(**{k: v[:4] for k, v in batch.items()})  # shifts the RNG stream by one chunk
    contrastive_step(unreplayed, lambda t: t.backward(), batch, loss="clip", chunk_size=4)
    text_weight = "text.transformer.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(dict(unreplayed.named_parameters())[text_weight].grad, grads[text_weight], atol=1e-6)


def test_frozen_text_tower_runs_once_per_chunk(tmp_path):
    config = tiny_clip_config(tiny_bert_dir(tmp_path), "clip", "model.text.frozen=true")
    model = build_model(config).train()
    calls = []
    model.text.transformer.register_forward_hook(lambda *args: calls.append(1))
    contrastive_step(model, lambda t: t.backward(), study_batch(), loss="clip", chunk_size=4, text_frozen=True)
    assert len(calls) == BATCH // 4  # pass 1 only; pass 3 reuses its pooled output
    assert model.text.proj.weight.grad is not None
    assert model.text.transformer.embeddings.word_embeddings.weight.grad is None


def test_gradient_cache_with_a_locked_text_tower_matches_a_full_batch_step(tmp_path):
    """A frozen tower without projection (its pooled state is the embedding): nothing of it trains."""
    config = tiny_clip_config(tiny_bert_dir(tmp_path, dropout=0.0), "clip", "model.text.frozen=true",
                              "model.text.projection=none", "model.projection_dim=32")
    torch.manual_seed(0)
    cached = build_model(config).train()
    full = copy.deepcopy(cached)
    assert not any(p.requires_grad for p in cached.text.parameters())
    batch = study_batch(2)
    result = contrastive_step(cached, lambda t: t.backward(), batch, loss="clip", chunk_size=3, text_frozen=True)
    loss = full_batch_loss(full, batch, "clip")
    loss.backward()
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q in zip(cached.named_parameters(), full.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert cached.visual.patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("chunk_size", "forwards"), [(4, 7), (16, 1)])
def test_every_chunk_but_the_last_runs_forward_twice(tmp_path, chunk_size, forwards):
    """The last chunk keeps its graph from pass 1; a plain step (one chunk) runs forward once."""
    model = build_model(tiny_clip_config(tiny_bert_dir(tmp_path))).train()
    calls = []
    model.visual.register_forward_hook(lambda module, args, out: calls.append(torch.is_grad_enabled()))
    contrastive_step(model, lambda t: t.backward(), study_batch(), loss="clip", chunk_size=chunk_size)
    assert len(calls) == forwards
    assert calls.count(True) == BATCH // chunk_size  # each chunk once with grad


# -- DeepSpeed ZeRO 0-3 with 2 workers x 4 chunks ------------------------------------------
def reference_step(config, batch, kind, sentence_weight=0.0):
    """One single-process full-batch step with the trainer's optimizer settings."""
    torch.manual_seed(0)
    model = build_model(config).train()
    train = config.train
    optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    for group in optimizer.param_groups:
        group["lr"] = train.lr * lr_factor(0, train.warmup_steps, train.max_steps)
    full_batch_loss(model, batch, kind, sentence_weight).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    return model.state_dict(), float(norm)


@pytest.mark.slow
def test_gradient_cache_under_deepspeed_zero_0_to_3_matches_a_single_process_step(tmp_path, ray_session):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    text_dir = tiny_bert_dir(tmp_path, dropout=0.0)
    # every stage with both losses, and the dual loss (report and one sentence) under ZeRO-3
    cases = [(stage, kind, 0.0) for stage in (0, 1, 2, 3) for kind in ("clip", "siglip")] + [(3, "clip", 0.7)]
    out = tmp_path / "out"
    out.mkdir()

    def worker(loop_config):
        import functools

        import ray.train
        import torch

        from hlip_ray.model import build_model
        from hlip_ray.train.engine import build_engine
        from hlip_ray.train.grad_cache import contrastive_step

        rank = ray.train.get_context().get_world_rank()
        batch = with_sentences(study_batch())
        half = BATCH // 2
        local = {key: value[rank * half : (rank + 1) * half] for key, value in batch.items()}
        for stage, kind, weight in loop_config["cases"]:
            config = tiny_clip_config(loop_config["text_dir"], kind, f"train.zero_stage={stage}")
            torch.manual_seed(0)
            engine, _, _ = build_engine(build_model(config).train(), config, world_size=2)
            contrastive_step(engine, functools.partial(engine.backward, scale_wrt_gas=False), local, loss=kind,
                             chunk_size=half // 4, sentence_weight=weight)
            if stage == 0:  # DeepSpeed reduces (and records no norm) inside step(): reduce a copy here
                grads = [p.grad.clone() for p in engine.module.parameters() if p.grad is not None]
                for grad in grads:
                    torch.distributed.all_reduce(grad)
                norm = float(torch.stack([(g / 2).norm() for g in grads]).norm())
            engine.step()
            if stage > 0:
                norm = float(engine.get_global_grad_norm())
            state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
            if rank == 0:
                torch.save({"state": state, "grad_norm": norm}, f"{loop_config['out']}/zero{stage}-{kind}-{weight}.pt")

    TorchTrainer(
        worker, train_loop_config={"cases": cases, "text_dir": str(text_dir), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "trainer": 1}),
        run_config=RunConfig(name="zero-equivalence", storage_path=str(tmp_path / "runs"),
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT)}}),
    ).fit()

    batch = with_sentences(study_batch())
    for stage, kind, weight in cases:
        expected, expected_norm = reference_step(tiny_clip_config(text_dir, kind), batch, kind, weight)
        got = torch.load(out / f"zero{stage}-{kind}-{weight}.pt")
        assert got["grad_norm"] == pytest.approx(expected_norm, rel=1e-4), (stage, kind)
        torch.manual_seed(0)
        initial = build_model(tiny_clip_config(text_dir, kind)).state_dict()
        moved = 0
        for name, value in expected.items():
            torch.testing.assert_close(got["state"][name].float(), value.float(), atol=2e-5, rtol=1e-4,
                                       msg=f"zero{stage} {kind} {name}")
            moved += int(not torch.equal(value, initial[name]))
        assert moved > 10, json.dumps([stage, kind])  # the step did change the weights
