"""The vision-language model: splicing, projectors, KV-cache generation, stages, LoRA and export, on a tiny random
Llama saved to a folder (``soc["lm"]``, ``mmlit data tiny-lm``) and loaded back through the path a downloaded model
takes."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmlit.cli import main
from mmlit.data import iter_samples
from mmlit.models import HFCausalLM
from mmlit.models.hf import LoRA
from mmlit.models.projector import Projector
from mmlit.tasks.vlm import IGNORE, splice

from .._processes import run_cli
from ..conftest import REPO, write_recipe


def test_splice_puts_the_image_tokens_in_the_slot():
    embeds = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)  # rows [0 1 2 3], [4 5 6 7]
    image = -torch.arange(1, 2 * 3 + 1, dtype=torch.float).view(2, 3, 1)  # rows [-1 -2 -3], [-4 -5 -6]
    mask = torch.tensor([[True] * 4, [False, True, True, True]])  # the second row padded on the left
    labels = torch.tensor([[IGNORE, IGNORE, 9, 9], [IGNORE, IGNORE, IGNORE, 8]])
    out, out_mask, out_labels = splice(embeds, mask, torch.tensor([1, 2]), image, labels)
    assert out[..., 0].tolist() == [[0, -1, -2, -3, 2, 3], [4, 5, -4, -5, -6, 7]]
    assert out_mask.tolist() == [[True] * 6, [False] + [True] * 5]
    assert out_labels.tolist() == [[IGNORE] * 4 + [9, 9], [IGNORE] * 5 + [8]]


def test_pixel_shuffle_concatenates_each_patch_of_the_grid():
    projector = Projector("pixel_shuffle", in_dim=1, out_dim=4, factor=2)
    grid = torch.arange(16, dtype=torch.float).view(1, 16, 1)  # a 4x4 grid, row-major
    shuffled = projector._shuffle(grid)
    assert shuffled.shape == (1, 4, 4) and projector.tokens(16) == 4
    assert shuffled[0, 0].tolist() == [0, 1, 4, 5] and shuffled[0, 3].tolist() == [10, 11, 14, 15]
    with pytest.raises(ValueError, match="square grid"):
        projector._shuffle(torch.zeros(1, 15, 1))


def test_generation_with_the_kv_cache_equals_greedy_decoding_without_it(soc):
    """Left-padded prompts of different lengths: ``generate`` (KV cache, positions from the mask) picks the tokens a
    full forward pass per step picks."""
    torch.manual_seed(0)
    lm = HFCausalLM(soc["lm"]).eval()
    embeds = torch.randn(2, 5, lm.dim)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    generated, score = lm.generate(embeds, mask, max_new_tokens=4, eos=[-1], pad=0)  # (no EOS: every step counts)
    assert generated.shape == (2, 4)
    for row in range(2):
        total = 0.0
        real = embeds[row:row + 1, mask[row]]
        ids = []
        for _ in range(4):
            step = torch.cat([real, lm.embed(torch.tensor([ids], dtype=torch.long))], dim=1) if ids else real
            logits = lm.lm(step, torch.ones(step.shape[:2], dtype=torch.bool)).logits
            ids.append(int(logits[0, -1].argmax()))
            total += float(logits[0, -1].log_softmax(-1).max())
        assert generated[row].tolist() == ids
        assert score[row].item() == pytest.approx(total, abs=1e-4)  # the log-probability of what it generated


def test_the_lm_read_as_a_text_encoder_pools_its_last_real_token(soc):
    """Texts through the text modality's pipeline (the LM's own tokenizer, ids + 1, 0-padded) into ``HFCausalLM``:
    each text's pooled vector is the LM's last hidden state at its last token, whatever the padding beside it."""
    from mmlit.data.collate import pad
    from mmlit.modalities.text import TextPipeline

    lm = HFCausalLM(soc["lm"]).eval()
    pipeline = TextPipeline(lm.max_length, lm.tokenizer_file)
    rows = [pipeline("what shape is the red object", None), pipeline("left", None)]
    with torch.no_grad():
        _, pooled, mask = lm(pad(rows))
        for row, vector in zip(rows, pooled):
            alone = lm.model(input_ids=torch.tensor([[i - 1 for i in row]]), output_hidden_states=True)
            assert torch.allclose(vector, alone.hidden_states[-1][0, -1], atol=1e-5)
    assert mask.sum(1).tolist() == [len(r) for r in rows]


def test_generation_ignores_the_folders_generation_settings(soc, tmp_path):
    """A folder's generation_config.json (a repetition penalty, as chat models ship) does not change evaluation's greedy
    decoding."""
    import shutil

    folder = shutil.copytree(soc["lm"], tmp_path / "lm")
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "repetition_penalty": 3.0,
                                                               "no_repeat_ngram_size": 1}))
    torch.manual_seed(0)
    embeds, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    plain, penalised = HFCausalLM(soc["lm"]).eval(), HFCausalLM(str(folder)).eval()
    ids, score = plain.generate(embeds, mask, max_new_tokens=6, eos=[-1], pad=0)
    again, score_again = penalised.generate(embeds, mask, max_new_tokens=6, eos=[-1], pad=0)
    assert torch.equal(ids, again) and torch.allclose(score, score_again)


def test_lora_adapts_gpt2_shaped_conv1d_layers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    lm = HFCausalLM(str(tmp_path), lora=LoRA(r=2, target_modules=["c_attn"]))
    assert {n for n, p in lm.named_parameters() if p.requires_grad} and lm.max_length == 32
    with pytest.raises(ValueError, match="max_length: the model takes at most 32 positions"):
        HFCausalLM(str(tmp_path), max_length=64)


def test_lora_trains_adapters_only_and_merges_into_the_weights(soc):
    lm = HFCausalLM(soc["lm"], lora=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="no linear layer named wq"):
        HFCausalLM(soc["lm"], lora=LoRA(target_modules=["wq"]))
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # (B starts at zero: make the adapters change the output)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = lm.model(input_ids=ids).logits
        merged = lm.model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5)


def _recipe(soc: dict, run, stage: str, lr: float = 0.01, **task) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / "vlm.yaml").read_text())
    # One validation batch (its generation) per evaluation: the test asserts on training and on predict's answers
    recipe["trainer"].update(max_epochs=1, default_root_dir=str(run), enable_progress_bar=False, log_every_n_steps=1,
                             enable_model_summary=False, limit_val_batches=1,
                             logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                      "init_args": {"save_dir": str(run), "name": "csv"}}])
    recipe["model"]["backbone"]["init_args"]["encoders"]["image"]["init_args"].update(
        model_name="test_byobnet", dim=32, feature_index=2)
    recipe["model"]["backbone"]["init_args"]["encoders"]["text"]["init_args"]["path"] = soc["lm"]
    vqa = recipe["model"]["tasks"]["vqa"]["init_args"]
    vqa.update(shards={"train": soc["train"], "val": soc["val"], "test": soc["test"]}, batch_size=2, stage=stage,
               projector="pixel_shuffle", **task)  # (a 10 x 10 grid: 25 image tokens in the LM's sequence)
    recipe["model"]["optimizer"]["init_args"]["lr"] = lr
    recipe["model"].pop("scheduler")
    recipe["data"].update(steps_per_epoch=12, num_workers=0, shuffle_buffer=20)
    return recipe


def _losses(run) -> list[float]:
    rows = csv.DictReader(open(next((run / "csv").glob("version_*/metrics.csv"))))
    return [float(r["train/vqa/loss"]) for r in rows if r.get("train/vqa/loss")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vlm_recipe_aligns_then_finetunes_with_lora_then_predicts_and_exports(soc, tmp_path):
    """Stage align through the CLI: the LM and the image encoder stay as they were, the projector learns (loss down).
    Stage finetune with LoRA from the align run's projector: only adapters change in the LM. ``mmlit predict``
    generates answers; ``mmlit export`` writes the LM merged, loadable by transformers, with the trained outputs."""
    lm_weights = load_file(f"{soc['lm']}/model.safetensors")
    align = tmp_path / "align"
    config = write_recipe(_recipe(soc, align, "align", lr=0.03), tmp_path / "align.yaml")
    result = run_cli("fit", "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _losses(align)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses  # (a random LM: ~0.9)
    state = torch.load(align / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    own_layers = [k for k in state if k.startswith(("tasks.vqa.projector.", "backbone.encoders.image."))
                  and not k.startswith("backbone.encoders.image.model.") and state[k].is_floating_point()]
    trainable, frozen = (int(n.replace(",", "")) for n in
                         re.search(r"parameters:  ([\d,]+) trainable, ([\d,]+) frozen", result.stdout).groups())
    assert trainable == sum(state[k].numel() for k in own_layers) and frozen > trainable  # what trains
    batch_norms = [k for k in state if k.startswith("backbone.encoders.image.model.") and "num_batches_tracked" in k]
    assert batch_norms and all(state[k] == 0 for k in batch_norms)  # the frozen trunk ran in eval mode
    prefix = "backbone.encoders.text.model."
    lm_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for name, value in lm_weights.items():
        assert torch.equal(lm_state[name], value), name  # frozen: bit for bit

    finetune = tmp_path / "finetune"
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    recipe = _recipe(soc, finetune, "finetune", projector_from=str(align / "checkpoints" / "last.ckpt"))
    recipe["model"]["backbone"]["init_args"]["encoders"]["text"]["init_args"]["lora"] = lora
    recipe["data"]["steps_per_epoch"] = 3  # (what it asserts, adapters moved and the base did not, holds from step 1)
    config = write_recipe(recipe, tmp_path / "finetune.yaml")
    result = run_cli("fit", "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = finetune / "checkpoints" / "last.ckpt"
    tuned = torch.load(checkpoint, weights_only=True)["state_dict"]
    adapters = {k: v for k, v in tuned.items() if "lora_B" in k}
    assert adapters and any(v.abs().sum() > 0 for v in adapters.values())  # B starts at zero: the adapters trained
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in tuned.items()
            if k.startswith(prefix) and "lora_" not in k}
    for name, value in lm_weights.items():
        assert torch.equal(base[prefix + name], value), name

    # predict and export in this process (main is what the mmlit command runs): a process of their own would spend
    # most of its time on imports
    main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint)])
    rows = [json.loads(line) for line in (finetune / "predictions" / "vqa.rank0.jsonl").open()]
    assert len(rows) == 20 * sum(1 for _ in iter_samples(soc["test"]))
    assert all(isinstance(r["prediction"], str) and r["score"] <= 0 for r in rows)

    out = tmp_path / "export"
    assert main(["export", "--config", str(config), "--ckpt", str(checkpoint), "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "text", local_files_only=True).eval()
    trained = HFCausalLM(soc["lm"], lora=LoRA(**lora)).eval()
    trained.load_state_dict({k[len("backbone.encoders.text."):]: v for k, v in tuned.items()
                             if k.startswith("backbone.encoders.text.")})
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trained.model(input_ids=ids).logits, atol=1e-5)
    assert (out / "text-adapter" / "adapter_config.json").is_file() and (out / "text" / "tokenizer.json").is_file()


def test_vlm_captions_by_generation_and_scores_them(soc):
    """``target: caption``: the caption prompt, the caption as the answer; evaluation generates and reports the caption
    metrics against every reference, in the LM's tokens."""
    import itertools

    from mmlit.data import TaskStream, scan_shards
    from mmlit.data.transforms import ImageTransform
    from mmlit.models import Backbone, TimmImageEncoder
    from mmlit.tasks import VLM, Shards

    torch.manual_seed(0)
    backbone = Backbone({"image": TimmImageEncoder("test_byobnet", dim=32, image_size=75, feature_index=2),
                         "text": HFCausalLM(soc["lm"])})
    task = VLM(Shards(val=soc["val"]), batch_size=3, target="caption", caption_field="json.caption",
               projector="linear", max_new_tokens=6, transform=ImageTransform(augment=False, crop_pct=1.0))
    task.build(backbone)
    backbone.eval(), task.eval()
    stream = TaskStream(task, scan_shards(soc["shards"]["val"], "k"), None, batch_size=3, train=False)
    metrics = task.metrics()
    with torch.no_grad():
        for _, batch, _ in itertools.islice(iter(stream), 2):
            outputs = task(backbone, batch)
            task.update_metrics(metrics, outputs, batch)
    assert outputs["generated"].shape[1] <= 6 and torch.isfinite(outputs["loss"])
    values = metrics.compute()
    assert set(values) == {"exact_match", "token_acc", "bleu4", "cider"}
    assert all(0.0 <= v.item() <= 10.0 for v in values.values())
    rows = task.predict(outputs, batch, None)
    assert len(rows) == 3 and all("question_index" not in r for r in rows)
