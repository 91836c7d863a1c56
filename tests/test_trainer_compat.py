"""bertfast's heads under transformers' Trainer, unchanged: a few optimizer steps on a tiny
random model with bertfast's collators, no errors, and the loss goes down."""
import os

import pytest
import torch

import bertfast
from bertfast.collators import CausalLMCollator, PaddingCollator

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it

VOCAB = 40
HEADS = ["BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
         "BertForMaskedLM", "BertLMHeadModel"]


def dataset(head, n=64):
    """Tasks a tiny random model learns in a few steps ([CLS] = 2, [SEP] = 3, [MASK] = 4)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        lab = i % 2
        ids = [2] + torch.randint(10, VOCAB, (8,), generator=g).tolist() + [3]
        if head == "BertForSequenceClassification":  # the label's token, four times
            ids[1:5] = [5 + lab] * 4
            rows.append({"input_ids": ids, "labels": lab})
        elif head == "BertForTokenClassification":  # tag: is the token even
            rows.append({"input_ids": ids, "labels": [-100] + [t % 2 for t in ids[1:-1]] + [-100]})
        elif head == "BertForQuestionAnswering":  # the answer: the tokens 7 8, wherever they are
            p = 1 + i % 6
            ids[p:p + 2] = [7, 8]
            rows.append({"input_ids": ids, "start_positions": p, "end_positions": p + 1})
        elif head == "BertForMaskedLM":  # one word repeated, some copies masked
            w = 10 + i % 4
            ids = [2] + [w] * 8 + [3]
            labels = [-100] * 10
            for j in (1 + i % 8, 1 + (i + 3) % 8, 1 + (i + 5) % 8):  # three copies masked
                labels[j], ids[j] = w, 4
            rows.append({"input_ids": ids, "labels": labels})
        else:  # causal LM: one word repeated (the next word is the last one)
            rows.append({"input_ids": [2] + [10 + i % (VOCAB - 10)] * 8 + [3]})
    return rows


def checkpointing_args():
    """TrainingArguments' gradient checkpointing switch, by the name the installed transformers
    uses (transformers >= 5.2x: activation_checkpointing, gradient_checkpointing its deprecated alias)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True}


@pytest.mark.parametrize("head,checkpointing", [(h, False) for h in HEADS] + [("BertForTokenClassification", True)])
def test_head_trains_under_transformers_trainer(head, checkpointing, tmp_path, monkeypatch):
    """checkpointing: Trainer(gradient_checkpointing=True) calls the model's
    gradient_checkpointing_enable (before: AttributeError inside Trainer), and every layer is
    recomputed in the backward."""
    for k in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(k)
    torch.manual_seed(0)
    cfg = bertfast.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=16,
                              num_labels=2, is_decoder=head == "BertLMHeadModel")
    model = getattr(bertfast.modeling, head)(cfg)
    collator = CausalLMCollator(0) if head == "BertLMHeadModel" else PaddingCollator(0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=32, per_device_train_batch_size=8, learning_rate=3e-3,
        warmup_steps=0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0, dataloader_num_workers=0, **(checkpointing_args() if checkpointing else {}))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(head), data_collator=collator)
    layer_calls = []
    for layer in model.bert.encoder.layer:
        layer.register_forward_pre_hook(lambda *a: layer_calls.append(torch.is_grad_enabled()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and CI gives each worker one core
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 32 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.85 * first, losses
    assert model.is_gradient_checkpointing == checkpointing
    # each step runs both layers once, and again in the backward when checkpointed
    assert len(layer_calls) == 32 * 2 * (2 if checkpointing else 1)
