"""Preference tuning equals TRL's trainers (DPO sigmoid, robust, IPO; KTO; ORPO) on the same weights and batch.

Both sides hold the same NF4 base (quantization is deterministic), the same LoRA weights (copied from qlora's
layers into PEFT's, B non-zero so the adapter changes the output) and the same rows. TRL tokenizes its own
batch with its own collator; the test first checks that qlora's token ids and response masks are the same,
then compares the loss and every LoRA gradient, float32 compute. TRL casts a 4-bit model's adapter to bfloat16
when the trainer is built (qlora keeps float32 master weights); the test puts PEFT's weights back in float32.

Two references: the base alone (qlora's default; TRL's when its "ref" adapter is removed, as for a new adapter)
and a frozen copy of a starting adapter (qlora's ``ref_adapter``; TRL's "ref" adapter copy of a PEFT model's),
where the policy then moves away from it by the same noise on both sides.
"""

from __future__ import annotations

import random

import pytest
import torch

from qlora_cli.config import load_config
from qlora_cli.data.pipeline import IGNORE_INDEX
from qlora_cli.data.preference import tokenize_preference_rows, unpair
from qlora_cli.data.sources import Row
from qlora_cli.model.loading import load_base_model
from qlora_cli.model.lora import freeze_reference, inject_lora, lora_layers
from qlora_cli.testing.tiny import build_char_tokenizer
from qlora_cli.train.preference import Objective, micro_batch_loss
from tests.test_peft_equivalence import _peft_model

trl = pytest.importorskip("trl", reason="TRL, the reference, is not installed (pip install -e .[reference])")

CPU = torch.device("cpu")
# float32 on both sides; the paths differ in summation order (qlora's 4-bit matmul and head vs PEFT's and TRL's)
LOSS_TOL, GRAD_TOL = 1e-5, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def _rows(n: int = 6) -> list[Row]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
        rows.append(
            Row(f"t.jsonl:{i + 1}", {"prompt": f"upper {'.' * i}{w}: ", "chosen": w.upper(), "rejected": w[::-1]})
        )
    return rows


def _unpaired(rows: list[Row]) -> list[Row]:
    out = []
    for i, r in enumerate(rows):  # alternate, so the batch has both labels
        good = i % 3 != 2
        completion = r.fields["chosen"] if good else r.fields["rejected"]
        out.append(Row(r.where, {"prompt": r.fields["prompt"], "completion": completion, "label": good}))
    return out


def _qlora_model(folder, method: str, **kw):
    cfg = load_config(
        None,
        base_model=str(folder),
        datasets=[{"path": "x", "type": "unpaired" if method == "kto" else "preference"}],
        method=method,
        bnb_4bit_compute_dtype="float32",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
        **kw,
    )
    torch.manual_seed(0)
    model = load_base_model(cfg, CPU)
    inject_lora(model, cfg.lora)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.weight.normal_(0, 0.05)
    model.train()
    init = {n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone()) for n, m in lora_layers(model)}
    return cfg, model, init


def _trainer(method: str, peft_model, tokenizer, rows: list[Row], **kw):
    from datasets import Dataset

    common = {"output_dir": "unused", "use_cpu": True, "bf16": False, "report_to": [], "gradient_checkpointing": False}
    common["per_device_train_batch_size"] = len(rows)
    data = Dataset.from_list([r.fields for r in rows])
    if method == "dpo":
        args = trl.DPOConfig(**common, max_length=None, **kw)
        return trl.DPOTrainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer)
    if method == "kto":
        args = trl.KTOConfig(**common, max_length=None, **kw)
        return trl.KTOTrainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(**common, max_length=512, **kw)
    return ORPOTrainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer)


def _restore(peft_model, init, noise: dict | None = None) -> None:
    """PEFT's "default" adapter back to float32 and the init weights (plus ``noise``); "ref" in float32 too."""
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, (a, b) in init.items():
            layer = modules[name]
            for adapter in layer.lora_A:
                for which, value in ((layer.lora_A, a), (layer.lora_B, b)):
                    w = which[adapter].weight
                    w.data = value.clone()
                    if adapter == "default" and noise is not None:
                        w.data += noise[(name, which is layer.lora_A)]


def _grads(peft_model, init) -> dict[str, torch.Tensor]:
    modules = dict(peft_model.base_model.model.named_modules())
    out = {}
    for name in init:
        out[f"{name}.A"] = modules[name].lora_A["default"].weight.grad
        out[f"{name}.B"] = modules[name].lora_B["default"].weight.grad
    return out


def compare(method: str, folder, reference: str, ours: dict, theirs: dict) -> tuple[float, float]:
    """(relative loss difference, largest relative gradient difference) of qlora against TRL on one batch."""
    tokenizer = build_char_tokenizer(chat_template=None)  # plain prompt + response, as TRL's non-chat rows
    cfg, model, init = _qlora_model(folder, method, **ours)
    rows = _rows()
    if method == "kto":
        rows = _unpaired(rows)
    peft_model, _ = _peft_model(folder, cfg, init)
    trainer = _trainer(method, peft_model, tokenizer, rows, **theirs)
    noise = None
    if reference == "adapter":
        assert "ref" in peft_model.peft_config  # TRL copied the starting adapter as its reference
        freeze_reference(model)
        g = torch.Generator().manual_seed(1)
        noise = {}
        with torch.no_grad():
            for name, m in lora_layers(model):
                for is_a, w in ((True, m.lora_A.weight), (False, m.lora_B.weight)):
                    noise[(name, is_a)] = torch.randn(w.shape, generator=g) * 0.02
                    w += noise[(name, is_a)]
    elif "ref" in peft_model.peft_config:
        peft_model.delete_adapter("ref")  # TRL's reference is then the base alone (adapters disabled)
    _restore(peft_model, init, noise)

    examples, _ = tokenize_preference_rows(rows, "unpaired" if method == "kto" else "preference", tokenizer, 512)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    _check_same_tokens(method, examples, batch)

    objective = Objective.from_config(cfg)
    loss, _ = micro_batch_loss(
        model,
        [[e] for e in examples],
        objective,
        device=CPU,
        pad_id=tokenizer.pad_token_id,
        item_scale=1 / len(examples),
        token_scale=1 / max(sum(_nll_tokens(e, objective) for e in examples), 1),
    )
    loss.backward()
    trl_loss = trainer.compute_loss(peft_model, batch)
    trl_loss.backward()
    theirs_grads = _grads(peft_model, init)
    rel_loss = abs(float(loss.detach()) - float(trl_loss.detach())) / abs(float(trl_loss.detach()))
    worst = 0.0
    for name, m in lora_layers(model):
        for key, w in ((f"{name}.A", m.lora_A.weight), (f"{name}.B", m.lora_B.weight)):
            g = theirs_grads[key].float()
            assert g.norm() > 0, key
            worst = max(worst, float((w.grad - g).norm() / g.norm()))
    return rel_loss, worst


def _nll_tokens(e, objective) -> int:
    return len(e.input_ids) - 1 if objective.nll_on_prompt else e.n_targets


def _check_same_tokens(method: str, examples, batch) -> None:
    """qlora's token ids and response masks are TRL's for the same rows."""
    if method == "orpo":
        seqs = [(e.input_ids, e.labels) for e in examples] + [
            (e.rejected.input_ids, e.rejected.labels) for e in examples
        ]
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        response = labels != IGNORE_INDEX
    else:
        pairs = examples if method == "kto" else examples + [e.rejected for e in examples]
        seqs = [(e.input_ids, e.labels) for e in pairs]
        ids, mask, response = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()
    for i, (our_ids, our_labels) in enumerate(seqs):
        n = int(mask[i].sum())
        assert ids[i][mask[i].bool()].tolist() == our_ids, i
        theirs = response[i][mask[i].bool()].tolist()
        assert theirs[:n] == [t != IGNORE_INDEX for t in our_labels], i


CASES = {
    "dpo-sigmoid": ("dpo", {"beta": 0.1}, {"beta": 0.1, "loss_type": ["sigmoid"]}),
    "dpo-robust": (
        "dpo",
        {"beta": 0.3, "dpo_loss": "robust", "label_smoothing": 0.2},
        {"beta": 0.3, "loss_type": ["robust"], "label_smoothing": 0.2},
    ),
    "dpo-ipo": ("dpo", {"beta": 0.5, "dpo_loss": "ipo"}, {"beta": 0.5, "loss_type": ["ipo"]}),
    "kto": (
        "kto",
        {"beta": 0.2, "kto_desirable_weight": 1.5, "kto_undesirable_weight": 0.7, "micro_batch_size": 6},
        {"beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.7},
    ),
    # TRL's ORPO takes its NLL term over prompt and response: qlora's train_on_inputs: true
    "orpo": ("orpo", {"orpo_alpha": 0.25, "train_on_inputs": True}, {"beta": 0.25}),
}


@pytest.mark.parametrize("reference", ["base", "adapter"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trl(model_factory, case, reference):
    method, ours, theirs = CASES[case]
    if method == "orpo" and reference == "adapter":
        pytest.skip("ORPO has no reference model")
    folder = model_factory("llama", initializer_range=0.1, layers=1, hidden=32)
    rel_loss, rel_grad = compare(method, folder, reference, ours, theirs)
    assert rel_loss < LOSS_TOL, f"{case}: loss differs from TRL's by {rel_loss:.2e}"
    assert rel_grad < GRAD_TOL, f"{case}: LoRA gradients differ from TRL's by up to {rel_grad:.2e}"


@pytest.mark.parametrize("case", ["dpo-sigmoid", "kto"])
def test_a_wrong_beta_fails_the_comparison(model_factory, case):
    """The comparison can fail: beta 0.2 on qlora's side against TRL's 0.1."""
    method, ours, theirs = CASES[case]
    folder = model_factory("llama", initializer_range=0.1, layers=1, hidden=32)
    rel_loss, rel_grad = compare(method, folder, "base", {**ours, "beta": ours["beta"] * 2}, theirs)
    assert rel_loss > 100 * LOSS_TOL or rel_grad > 100 * GRAD_TOL


def test_orpo_nll_on_responses_only_by_default(model_factory):
    """Without train_on_inputs, ORPO's NLL term is the chosen responses' mean token NLL (the paper's L_SFT)."""
    tokenizer = build_char_tokenizer(chat_template=None)
    folder = model_factory("llama", initializer_range=0.1, layers=1, hidden=32)
    cfg, model, _ = _qlora_model(folder, "orpo", orpo_alpha=0.25)
    examples, _ = tokenize_preference_rows(_rows(), "preference", tokenizer, 512)
    objective = Objective.from_config(cfg)
    n_tokens = sum(e.n_targets for e in examples)
    with torch.no_grad():
        loss, sums = micro_batch_loss(
            model,
            [[e] for e in examples],
            objective,
            device=CPU,
            pad_id=tokenizer.pad_token_id,
            item_scale=1 / len(examples),
            token_scale=1 / n_tokens,
        )
        from qlora_cli.data.pipeline import collate

        batch = collate(examples, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )
    assert sums.values["nll_tokens"] == n_tokens
    assert float(sums.values["nll"]) == pytest.approx(float(nll), rel=1e-5)
    odds_term = float(sums.values["loss_items"]) / len(examples)
    assert float(loss) == pytest.approx(float(nll) / n_tokens + odds_term, rel=1e-5)


def test_unpair_turns_each_pair_into_two_labelled_responses(tokenizer):
    examples, _ = tokenize_preference_rows(_rows(3), "preference", tokenizer, 512)
    rejected = [e.rejected.input_ids for e in examples]
    flat = unpair(examples)
    assert [e.label for e in flat] == [True, False] * 3
    assert [e.input_ids for e in flat[1::2]] == rejected
    assert all(e.rejected is None for e in flat)
