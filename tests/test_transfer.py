"""Transfer learning: backbone weights from checkpoints and files, export, the optimizer's parameter groups (layer-wise
learning-rate decay, no weight decay on 1-D parameters), freezing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mmlit.callbacks import Freeze
from mmlit.models import Backbone, CrossAttentionFusion, LateFusion, TimmImageEncoder, TransformerTextEncoder
from mmlit.models.backbone import Encoded
from mmlit.optim import parameter_groups
from mmlit.transfer import export_backbone, load_backbone_weights

from .objectives._train import build_module, loader, step_batches, trainer

D = 32


def _backbone(seed: int, fusion: bool = True, vit: bool = False) -> Backbone:
    torch.manual_seed(seed)
    image = (TimmImageEncoder("vit_tiny_patch16_224", dim=D, model_kwargs={
        "img_size": 75, "patch_size": 15, "embed_dim": 32, "depth": 3, "num_heads": 2}) if vit
        else TimmImageEncoder("test_efficientnet", dim=D, image_size=75, feature_index=3))
    return Backbone({"image": image, "text": TransformerTextEncoder(256, D, depth=2, heads=2, max_length=40)},
                    CrossAttentionFusion(D, depth=1, heads=2) if fusion else None)


def _checkpoint(backbone: Backbone, path) -> None:
    """What Lightning saves for a MultiTaskModule: its state_dict under ``state_dict`` (plus a head)."""
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": {**state, "tasks.vqa.head.0.weight": torch.zeros(2, 2)}, "global_step": 3}, path)


def test_dual_encoder_checkpoint_starts_a_fused_backbone(tmp_path):
    source, target = _backbone(0, fusion=False), _backbone(1)
    _checkpoint(source, tmp_path / "last.ckpt")
    fusion_before = {k: v.clone() for k, v in target.fusion.state_dict().items()}
    assert load_backbone_weights(target, tmp_path / "last.ckpt") == ["encoders.image", "encoders.text"]
    for part in ("image", "text"):
        mine, theirs = target.encoders[part].state_dict(), source.encoders[part].state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert all(torch.equal(target.fusion.state_dict()[k], v) for k, v in fusion_before.items()), "fusion starts fresh"


def test_export_writes_the_backbone_alone_and_it_loads_back(tmp_path):
    source = _backbone(0)
    _checkpoint(source, tmp_path / "last.ckpt")
    out = export_backbone(tmp_path / "last.ckpt", tmp_path / "export" / "backbone.safetensors")
    exported = load_file(str(out))
    assert set(exported) == set(source.state_dict()), "every backbone entry and no head"
    target = _backbone(1)
    assert load_backbone_weights(target, out) == ["encoders.image", "encoders.text", "fusion"]
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="safetensors"):
        export_backbone(tmp_path / "last.ckpt", tmp_path / "backbone.pt")


def test_a_file_of_the_older_key_shape_loads(tmp_path):
    """Backbones saved when encoders were ``image_encoder`` / ``text_encoder`` load as ``encoders.image`` / ``.text``."""
    source, target = _backbone(0), _backbone(1)
    old = {k.replace("encoders.image.", "image_encoder.").replace("encoders.text.", "text_encoder."): v
           for k, v in source.state_dict().items()}
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in old.items()}}, tmp_path / "old.ckpt")
    assert load_backbone_weights(target, tmp_path / "old.ckpt") == ["encoders.image", "encoders.text", "fusion"]
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_part_of_another_shape_is_a_clear_error(tmp_path):
    _checkpoint(_backbone(0), tmp_path / "last.ckpt")
    torch.manual_seed(0)
    other = Backbone({"image": TimmImageEncoder("test_efficientnet", dim=D, image_size=75, feature_index=3),
                      "text": TransformerTextEncoder(256, D, depth=1, heads=2, max_length=40)},
                     CrossAttentionFusion(D, 1, 2))
    with pytest.raises(ValueError, match=r"model.pretrained: .* does not fit model.backbone.init_args.encoders.text: "
                                         r"unexpected \['encoders.text.layers.layers.1"):
        load_backbone_weights(other, tmp_path / "last.ckpt")
    no_fusion = _backbone(0, fusion=False)
    with pytest.raises(ValueError, match="has fusion weights, but the recipe's backbone has no fusion"):
        load_backbone_weights(no_fusion, tmp_path / "last.ckpt")
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(no_fusion, tmp_path / "missing.ckpt")


def test_layer_decay_scales_each_encoder_by_depth():
    backbone = _backbone(0, vit=True)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": torch.nn.Linear(D, 3)})
    head = model["head"]
    groups = parameter_groups(model, backbone.encoders.values(), layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale) == len(list(model.parameters())), "every parameter in exactly one group"
    vit = backbone.encoders["image"].model
    # timm's group_matcher: stem 0, blocks 1..3; the encoder's own projection on top (4): scale 0.5 ** (4 - layer)
    assert scale[id(vit.patch_embed.proj.weight)] == 0.5 ** 4
    assert [scale[id(vit.blocks[i].attn.qkv.weight)] for i in range(3)] == [0.5 ** 3, 0.5 ** 2, 0.5]
    assert scale[id(backbone.encoders["image"].proj.weight)] == 1.0
    text = backbone.encoders["text"]
    assert scale[id(text.embed.weight)] == 0.5 ** 3 and scale[id(text.pos)] == 0.5 ** 3
    assert [scale[id(text.layers.layers[i].linear1.weight)] for i in range(2)] == [0.5 ** 2, 0.5]
    assert scale[id(text.layers.norm.weight)] == 1.0
    assert all(scale[id(p)] == 1.0 for p in [*backbone.fusion.parameters(), *head.parameters()])
    # timm's rule: no weight decay on biases, norms and other 1-D parameters, at every depth; the optimizer's own on
    # the others
    decay = {id(p): g.get("weight_decay") for g in groups for p in g["params"]}
    assert decay[id(head.bias)] == decay[id(text.layers.norm.weight)] == decay[id(vit.blocks[0].norm1.bias)] == 0.0
    assert decay[id(head.weight)] is None and decay[id(vit.blocks[0].attn.qkv.weight)] is None


@pytest.mark.parametrize("layer_decay", [1.0, 0.5])
def test_what_a_timm_model_names_in_no_weight_decay_takes_none(layer_decay):
    """A ViT's position embedding and class token (3-D) take no weight decay, as timm's optimizer factory has it."""
    backbone = _backbone(0, vit=True)
    vit = backbone.encoders["image"].model
    assert {"pos_embed", "cls_token"} <= set(vit.no_weight_decay())
    groups = parameter_groups(backbone, backbone.encoders.values(), layer_decay=layer_decay)
    decay = {id(p): g.get("weight_decay") for g in groups for p in g["params"]}
    assert decay[id(vit.pos_embed)] == decay[id(vit.cls_token)] == 0.0
    assert vit.pos_embed.ndim == 3 and decay[id(vit.patch_embed.proj.weight)] is None


def test_one_dimensional_parameters_take_no_weight_decay_without_layer_decay():
    module = build_module("uncertainty")
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    optimizer = module.configure_optimizers()
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(module.objective.log_variance)] == 0.0  # the uncertainty method's log-variances
    assert all(decay[id(p)] == (0.0 if p.ndim <= 1 else 0.1) for p in module.parameters())


def test_layer_decay_survives_the_scheduler():
    module = build_module("static")
    module.layer_decay = 0.5
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=0.01)
    module.scheduler_factory = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:  # OneCycleLR starts every group at max_lr / 25, times its scale
        assert group["lr"] == pytest.approx(0.01 / 25 * group["lr_scale"])
        assert group["max_lr"] == pytest.approx(0.01 * group["lr_scale"])
    assert {g["lr_scale"] for g in optimizer.param_groups} >= {1.0, 0.5, 0.25}
    module.scheduler_factory = lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.001, max_lr=0.01)
    with pytest.raises(ValueError, match="model.layer_decay: CyclicLR sets every parameter group"):
        module.configure_optimizers()


def test_freeze_holds_matching_parameters_until_the_step(soc, tmp_path):
    batches = step_batches(soc["shards"]["train"], soc["tokenizer"], 2, "whole")
    module = build_module("static")
    start = {k: v.clone() for k, v in module.state_dict().items()}
    seen = {}

    class Snapshot(Freeze):  # records the weights after step 2 (the last frozen one)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer(tmp_path, 4, callbacks=[Snapshot(["backbone.encoders.image.*"], until_step=2)]).fit(module, loader(batches * 2))
    image = [k for k in start if k.startswith("backbone.encoders.image.") and start[k].is_floating_point()]
    assert image and all(torch.equal(seen[k], start[k]) for k in image), "frozen for steps 0 and 1"
    assert not torch.equal(seen["backbone.encoders.text.embed.weight"], start["backbone.encoders.text.embed.weight"])
    after = module.state_dict()
    assert any(not torch.equal(after[k], start[k]) for k in image), "trains from step 2"
    with pytest.raises(ValueError, match=r"Freeze.patterns: 'backbone.encoders.imag.\*' matches no parameter"):
        trainer(tmp_path, 1, callbacks=[Freeze(["backbone.encoders.imag.*"])]).fit(build_module("static"), loader(batches))


def test_a_gated_late_fusion_of_the_older_shape_fuses_as_it_did(tmp_path):
    """The older gated fusion, ``z * tanh(W_i i) + (1 - z) * tanh(W_t t)`` with ``z = sigmoid(gate([i, t]))``, loads
    into the current one (a softmax gate over the modalities) and gives the same features."""
    torch.manual_seed(0)
    old = {"fusion.image_proj.weight": torch.randn(D, D), "fusion.image_proj.bias": torch.randn(D),
           "fusion.text_proj.weight": torch.randn(D, D), "fusion.text_proj.bias": torch.randn(D),
           "fusion.gate.weight": torch.randn(D, 2 * D), "fusion.gate.bias": torch.randn(D)}
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in old.items()}}, tmp_path / "old.ckpt")
    backbone = _backbone(1, fusion=False)
    backbone.fusion = LateFusion(D, "gated")
    assert load_backbone_weights(backbone, tmp_path / "old.ckpt") == ["fusion"]
    image, text = torch.randn(5, D), torch.randn(5, D)
    z = torch.sigmoid(torch.cat([image, text], -1) @ old["fusion.gate.weight"].T + old["fusion.gate.bias"])
    expected = (z * torch.tanh(image @ old["fusion.image_proj.weight"].T + old["fusion.image_proj.bias"])
                + (1 - z) * torch.tanh(text @ old["fusion.text_proj.weight"].T + old["fusion.text_proj.bias"]))
    fused = backbone.fusion({"image": Encoded(None, image), "text": Encoded(None, text)}, {}).pooled
    torch.testing.assert_close(fused, expected)
