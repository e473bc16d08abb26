"""Fine-tuning recipes: the losses against torch's own modules, RomeBERT's gradient projection against a direct
computation of both gradients, every recipe end to end on a user's TSV with exact resume, DeeBERT's frozen
backbone, and a best model that transformers loads with the same logits."""

import json
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_runs import final_parameters

from bertforge.model import BertConfig, BertForSequenceClassification, MultiExitBert
from bertforge.train.classification_data import classification_batches
from bertforge.train.cli import main as cli_main
from bertforge.train.finetune import (
    ExitRecipe,
    FinetuneConfig,
    build_trainer,
    classification_metrics,
    finetune,
    load_splits,
    pabee_loss,
    project_conflicting,
    projected_parameters,
    self_distillation_losses,
)
from bertforge.train.tokenizer import load_tokenizer


def tiny_exit_config(**overrides):
    values = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    values.update(overrides)
    return BertConfig(**values)


def run_config(checkpoint, data, out_dir, **overrides):
    values = dict(checkpoint=checkpoint, data=data, out_dir=str(out_dir), epochs=1, batch_size=16,
                  max_seq_length=32, lr=1e-3, eval_interval=4, log_interval=1, checkpoint_interval=100,
                  progress=False)
    values.update(overrides)
    return FinetuneConfig(**values)


def steps_per_epoch(cfg):
    """The dev split holds out about 10% of the random sentences, a few more or fewer each time."""
    return len(load_splits(cfg)["train"]) // cfg.batch_size


# -- losses ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # torch's own module, the reference
def test_self_distillation_matches_the_official_formula_with_torch_modules():
    logits = [torch.randn(5, 3) for _ in range(4)]
    labels = torch.randint(3, (5,))
    gamma, t = random.uniform(0.1, 0.9), random.uniform(1, 4)
    for reduction in ("mean", "batchmean"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's kl_div warns about reduction "mean"; users should not see it
            final, exits = self_distillation_losses(logits, labels, gamma, t, reduction)
        kl = torch.nn.KLDivLoss(reduction=reduction)  # the official code uses nn.KLDivLoss() (reduction "mean")
        expected = sum((1 - gamma) * torch.nn.CrossEntropyLoss()(z, labels)
                       + gamma * t * t * kl(F.log_softmax(z / t, -1), F.softmax(logits[-1] / t, -1))
                       for z in logits[:-1])
        assert torch.allclose(exits, expected, rtol=1e-5)
        assert torch.allclose(final, torch.nn.CrossEntropyLoss()(logits[-1], labels))


def test_pabee_loss_weights_layer_j_by_j():
    logits, labels = [torch.randn(4, 2) for _ in range(3)], torch.randint(2, (4,))
    ce = [torch.nn.CrossEntropyLoss()(z, labels) for z in logits]
    assert torch.allclose(pabee_loss(logits, labels), (ce[0] + 2 * ce[1] + 3 * ce[2]) / 6)


def test_the_distillation_teacher_is_detached():
    logits = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    _, exits = self_distillation_losses(logits, torch.randint(3, (4,)), 1.0, 2.0)  # gamma 1: distillation only
    exits.backward()
    assert logits[-1].grad is None and logits[0].grad.abs().sum() > 0


# -- gradient projection --------------------------------------------------------------------------------------


@pytest.mark.parametrize("anchor", ["exits", "final"])
def test_gradient_projection_equals_a_direct_computation_of_both_gradients(anchor):
    model = MultiExitBert(tiny_exit_config()).train()
    ids = torch.randint(5, 30522, (6, 9))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    labels = torch.randint(3, (6,))

    def losses():
        final, exits = self_distillation_losses(model(ids, mask).exit_logits, labels, 0.9, 3.0)
        return (exits, final) if anchor == "exits" else (final, exits)

    params = list(model.parameters())
    g_anchor = torch.autograd.grad(losses()[0], params, allow_unused=True)
    g_other = torch.autograd.grad(losses()[1], params, allow_unused=True)
    zero = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_anchor)]
    g_anchor, g_other = zero, [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_other)]
    projected = {id(p) for p in projected_parameters(model)}
    flat_a = torch.cat([g.flatten() for p, g in zip(params, g_anchor) if id(p) in projected]).double()
    flat_b = torch.cat([g.flatten() for p, g in zip(params, g_other) if id(p) in projected]).double()
    c = min(float(flat_a @ flat_b / (flat_a @ flat_a)), 0.0)

    a, b = losses()
    ExitRecipe._projected_backward(model, a, b)
    for p, ga, gb in zip(params, g_anchor, g_other):
        expected = ga + gb - (c * ga if id(p) in projected else 0)
        assert torch.allclose(p.grad.double(), expected.double(), rtol=1e-4, atol=1e-7)
    last = model.bert.encoder.layers[-1]
    assert projected and not projected & {id(p) for p in last.parameters()}
    assert all(p.dim() >= 2 for p in projected_parameters(model))


def test_projection_removes_exactly_the_conflicting_component():
    anchor = [torch.randn(3, 4), torch.randn(5)]
    conflicting = [-0.5 * anchor[0] + 0, -0.5 * anchor[1]]  # c = -0.5: the whole of it is removed
    assert all(torch.allclose(g, torch.zeros_like(g), atol=1e-6) for g in project_conflicting(anchor, conflicting))
    agreeing = [2 * anchor[0], 2 * anchor[1]]  # c > 0: left alone
    assert all(torch.equal(g, h) for g, h in zip(project_conflicting(anchor, agreeing), agreeing))


# -- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe, projection, exit_pooling", [
    ("final", False, "cls"), ("pabee", False, "cls"), ("deebert", False, "cls"), ("romebert", False, "cls"),
    ("romebert", True, "mean")])
def test_each_recipe_trains_on_a_users_tsv(checkpoint, sentiment_tsv, tmp_path, recipe, projection, exit_pooling):
    finetune(run_config(checkpoint, sentiment_tsv, tmp_path, recipe=recipe, gradient_projection=projection,
                        exit_pooling=exit_pooling))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals[-1]["exit_accuracy"]) == (1 if recipe == "final" else 3)
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert (tmp_path / "best" / "tokenizer.json").exists()
    assert config.get("exit_pooling") == (None if recipe == "final" else exit_pooling)


def test_head_lr_moves_the_poolers_and_classifiers_at_their_own_rate(checkpoint, sentiment_tsv, tmp_path):
    cfg = run_config(checkpoint, sentiment_tsv, tmp_path, recipe="romebert", lr=1e-7, head_lr=1e-2, steps=1,
                     warmup_ratio=0.0, eval_interval=0)
    before = {n: p.detach().clone() for n, p in build_trainer(cfg, load_splits(cfg)).model.named_parameters()}
    after = final_parameters(finetune(cfg))
    moved = {n: float((after[n] - before[n]).abs().max()) for n in before}
    heads = {n for n in moved if n.startswith(("classifier.", "exits.", "bert.pooler."))}
    assert any(n.startswith("exits.") and "pooler" in n for n in heads) and "bert.pooler.dense.weight" in heads
    # Adam's first step moves each parameter by about its learning rate.
    assert all(5e-3 < moved[n] < 1.5e-2 for n in heads), {n: moved[n] for n in heads}
    assert all(moved[n] < 2e-7 for n in set(moved) - heads), max(moved[n] for n in set(moved) - heads)


def test_romebert_with_projection_resumes_bit_for_bit(checkpoint, sentiment_tsv, tmp_path):
    cfg = dict(recipe="romebert", gradient_projection=True, eval_interval=0)
    whole = final_parameters(finetune(run_config(checkpoint, sentiment_tsv, tmp_path / "a", **cfg)))
    finetune(run_config(checkpoint, sentiment_tsv, tmp_path / "b", stop_after=5, **cfg))
    resumed = final_parameters(finetune(run_config(checkpoint, sentiment_tsv, tmp_path / "b", resume=True, **cfg)))
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resuming"


def test_deebert_trains_the_exits_only_in_its_second_stage(checkpoint, sentiment_tsv, tmp_path):
    cfg = run_config(checkpoint, sentiment_tsv, tmp_path, recipe="deebert", eval_interval=0)
    boundary = cfg.epochs * steps_per_epoch(cfg)
    stage_one = finetune(run_config(checkpoint, sentiment_tsv, tmp_path, recipe="deebert", eval_interval=0,
                                    stop_after=boundary))
    assert stage_one["step"] == boundary
    before = final_parameters(stage_one)
    after = final_parameters(finetune(run_config(checkpoint, sentiment_tsv, tmp_path, recipe="deebert",
                                                 eval_interval=0, resume=True)))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("exits.") for name in changed), sorted(changed)[:5]
    assert {n for n in before if n.startswith("exits.")} == changed


def test_deebert_keeps_the_best_model_of_its_second_stage(checkpoint, sentiment_tsv, tmp_path):
    """Its second stage trains only the exits, so the final exit's accuracy cannot pick the model to keep."""
    cfg = run_config(checkpoint, sentiment_tsv, tmp_path, recipe="deebert", eval_interval=4)
    finetune(cfg)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    best = [r for r in records if r["kind"] == "best"][-1]
    assert best["step"] > steps_per_epoch(cfg) and best["selected_by"] == "mean accuracy of the exits before the last"
    evaluated = next(r for r in records if r["kind"] == "eval" and r["step"] == best["step"])
    saved = MultiExitBert.from_pretrained(tmp_path / "best").eval()
    dev = classification_batches(load_splits(cfg)["dev"], load_tokenizer(checkpoint), 16, 32)
    with torch.no_grad():
        assert classification_metrics(saved, dev, torch.device("cpu"))["exit_accuracy"] == evaluated["exit_accuracy"]


def test_the_best_model_learns_and_loads_in_transformers_with_the_same_logits(checkpoint, sentiment_tsv, tmp_path):
    transformers = pytest.importorskip("transformers")
    # Learning comes as a jump, after 27 to 54 steps in 30 runs (in 1 of 7 more, after 63): 12 epochs, ~110 steps.
    cfg = run_config(checkpoint, sentiment_tsv, tmp_path, epochs=12, lr=3e-3, eval_interval=9)
    summary = finetune(cfg)
    evals = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert max(r["accuracy"] for r in evals) >= 0.8, evals  # the label is one word of the sentence
    assert summary["step"] == cfg.epochs * steps_per_epoch(cfg)
    best = tmp_path / "best"
    ours = BertForSequenceClassification.from_pretrained(best).eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(best).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(best)
    batch = tokenizer(["a good movie", "the end was dull and long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        got = theirs(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert theirs.config.id2label == {0: "neg", 1: "pos"}


def test_bad_recipe_settings_are_refused(tmp_path):
    with pytest.raises(SystemExit) as error:
        cli_main(["finetune", "--recipe", "fast", "--gamma", "2", "--gradient_projection", "true",
                  "--out_dir", str(tmp_path)])
    message = str(error.value.code)
    for expected in ["recipe must be one of", "gamma must be in [0, 1]", "gradient_projection is part of"]:
        assert expected in message, message
    for argv, expected in [(["--exit_pooling", "max"], "exit_pooling must be one of ('cls', 'mean'), got 'max'"),
                           (["--exit_pooling", "mean"], "exit_pooling is for the multi-exit recipes")]:
        with pytest.raises(SystemExit) as error:
            cli_main(["finetune", *argv, "--out_dir", str(tmp_path)])
        assert expected in str(error.value.code)
