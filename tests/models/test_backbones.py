"""Every backbone option trains: each image encoder, text encoder and registered fusion, tiny, on a fixed
Sort-of-CLEVR batch of the VQA task (the task that reads all three parts), and the parts keep their contracts."""

from __future__ import annotations

import inspect
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from mmlit.data import TaskStream, scan_shards
from mmlit.models import (Backbone, CausalTextDecoder, CrossAttentionFusion, EarlyFusion, Encoded, HybridFusion,
                          LateFusion, LSTMTextEncoder, RelationNetworkFusion, TimmImageEncoder, TransformerTextEncoder)
from mmlit.registry import get_fusion, list_fusions
from mmlit.data.transforms import ImageTransform
from mmlit.tasks import VQA, Contrastive, Shards
from mmlit.text import load_tokenizer

from .._soc import soc_task

D = 32
IMAGE = {
    "cnn": lambda: TimmImageEncoder("test_efficientnet", dim=D, image_size=75, feature_index=3),
    "cnn_coordinates": lambda: TimmImageEncoder("test_resnet", dim=D, image_size=75, feature_index=2, coordinates=True),
    "vit": lambda: TimmImageEncoder("vit_tiny_patch16_224", dim=D, image_size=75, model_kwargs={
        "img_size": 75, "patch_size": 15, "embed_dim": 32, "depth": 2, "num_heads": 2}),
}
TEXT = {
    "transformer": lambda: TransformerTextEncoder(256, D, depth=1, heads=2, max_length=40),
    "bert_cls": lambda: TransformerTextEncoder(256, D, depth=1, heads=2, max_length=40, pooling="cls"),
    "lstm": lambda: LSTMTextEncoder(256, D, max_length=40),
    "causal": lambda: CausalTextDecoder(256, D, depth=1, heads=2, max_length=40),
}
TINY = {"dim": D, "depth": 1, "heads": 2, "hidden": 64}  # what a fusion's constructor takes of these


def tiny_fusion(name: str, **kwargs):
    """The registered fusion ``name`` at width D with small settings; one built of other fusions (``HybridFusion``)
    gets an early and a gated late fusion."""
    cls = get_fusion(name)
    accepted = inspect.signature(cls).parameters
    if "fusions" in accepted:
        kwargs.setdefault("fusions", [EarlyFusion(D, depth=1, heads=2), LateFusion(D, "gated")])
    return cls(**{k: v for k, v in TINY.items() if k in accepted}, **kwargs)


def _backbone(image: str = "cnn", text: str = "transformer", fusion=None) -> Backbone:
    return Backbone({"image": IMAGE[image](), "text": TEXT[text]()}, fusion)


def _vqa_batch(backbone: Backbone, soc: dict) -> tuple[VQA, dict]:
    task = soc_task("vqa", Shards(train=soc["train"]), batch_size=2)
    task.name = "vqa"
    task.build(backbone)
    stream = TaskStream(task, scan_shards(soc["shards"]["train"], "k"), load_tokenizer(soc["tokenizer"]),
                        batch_size=2, train=True, seed=0, shuffle_buffer=8)
    return task, next(iter(stream))[1]


def _trains_down(backbone: Backbone, soc: dict, steps: int = 15) -> list[float]:
    task, batch = _vqa_batch(backbone, soc)
    params = [*backbone.parameters(), *task.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = task(backbone, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unused = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not unused, f"backbone parameters without a gradient: {unused[:5]}"
    assert losses[-1] < 0.7 * losses[0], losses
    return losses


@pytest.mark.parametrize("fusion", list_fusions())
def test_fusion_trains(fusion, soc):
    torch.manual_seed(0)
    _trains_down(_backbone(fusion=tiny_fusion(fusion)), soc)


@pytest.mark.parametrize("mode", ["sum", "gated"])
def test_late_fusion_trains_in_each_mode(mode, soc):
    torch.manual_seed(0)
    _trains_down(_backbone(fusion=LateFusion(D, mode)), soc)


@pytest.mark.parametrize("text", list(TEXT))
def test_text_encoder_trains(text, soc):
    torch.manual_seed(0)
    _trains_down(_backbone(text=text, fusion=CrossAttentionFusion(D, depth=1, heads=2)), soc)


@pytest.mark.parametrize("image", list(IMAGE))
def test_image_encoder_trains(image, soc):
    torch.manual_seed(0)
    _trains_down(_backbone(image=image, fusion=LateFusion(D, "concat")), soc)


def test_image_encoder_appends_each_cells_coordinates_before_the_projection():
    """``coordinates``: each cell's (x, y) from -1 to 1 joins its CNN features, in the tokens' row-by-row order."""
    encoder = IMAGE["cnn_coordinates"]()
    plain = TimmImageEncoder("test_resnet", dim=D, image_size=75, feature_index=2)
    seen = []
    encoder.proj.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    tokens = encoder(torch.randint(0, 256, (2, 3, 75, 75), dtype=torch.uint8)).tokens
    (cells,) = seen
    assert encoder.grid == (10, 10) and tokens.shape == (2, 100, D)
    assert cells.shape == (2, 100, plain.proj.in_features + 2)
    xy = cells[:, :, -2:].view(2, 10, 10, 2)
    steps = torch.linspace(-1, 1, 10)
    assert torch.allclose(xy[..., 0], steps.expand(2, 10, 10))  # x grows along a row
    assert torch.allclose(xy[..., 1], steps[:, None].expand(2, 10, 10))  # y down the rows


def _ids(rows: int = 3, length: int = 7, real: tuple[int, ...] = (7, 4, 1)) -> torch.Tensor:
    ids = torch.randint(5, 200, (rows, length))
    for row, n in enumerate(real):
        ids[row, n:] = 0
    return ids


def test_bert_cls_pooling_reads_a_learned_first_token():
    torch.manual_seed(0)
    encoder = TEXT["bert_cls"]()
    ids = _ids()
    tokens, pooled, mask = encoder(ids)
    assert tokens.shape == (3, 8, D) and mask[:, 0].all() and torch.equal(pooled, tokens[:, 0])
    assert torch.equal(mask[:, 1:], ids != 0)


def test_lstm_pooled_state_ignores_padding():
    torch.manual_seed(0)
    encoder = TEXT["lstm"]().eval()
    ids = _ids()
    longer = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(encoder(ids)[1], encoder(longer)[1], atol=1e-6)
    assert encoder(longer)[0].shape == (3, 12, D)


def test_causal_decoder_sees_only_the_past_and_the_whole_prefix():
    torch.manual_seed(0)
    decoder = TEXT["causal"]().eval()
    ids, prefix = _ids(real=(7, 7, 7)), torch.randn(3, 4, D)
    tokens = decoder(ids, prefix=prefix)[0]
    changed = ids.clone()
    changed[:, 5] = 9
    after = decoder(changed, prefix=prefix)[0]
    assert torch.allclose(tokens[:, :5], after[:, :5], atol=1e-6), "a token must not see later tokens"
    assert not torch.allclose(tokens[:, 5:], after[:, 5:])
    other_prefix = prefix.clone()
    other_prefix[:, -1] += torch.randn(D)  # not a constant: the pre-norm would remove it
    assert not torch.allclose(tokens[:, 0], decoder(ids, prefix=other_prefix)[0][:, 0]), "every token sees the prefix"


def test_causal_decoder_left_and_right_padding_agree():
    """Positions count real tokens, so a left-padded prompt (batched generation) reads as the right-padded one."""
    torch.manual_seed(0)
    decoder = TEXT["causal"]().eval()
    right, prefix = _ids(real=(7, 4, 1)), torch.randn(3, 4, D)
    left = torch.zeros_like(right)
    for row, n in enumerate((7, 4, 1)):
        left[row, 7 - n:] = right[row, :n]
    tokens_r, pooled_r, _ = decoder(right, prefix=prefix)
    tokens_l, pooled_l, _ = decoder(left, prefix=prefix)
    assert torch.allclose(pooled_r, pooled_l, atol=1e-5), "pooled is the last real token's state"
    for row, n in enumerate((7, 4, 1)):
        assert torch.allclose(tokens_r[row, :n], tokens_l[row, 7 - n:], atol=1e-5)


def test_relation_network_is_the_sum_of_g_over_every_pair():
    """The broadcast first layer equals g applied to every concatenated pair [o_i; o_j; q], as in the paper."""
    torch.manual_seed(0)
    rn = RelationNetworkFusion(D, hidden=16, g_layers=3, f_layers=2).eval()
    objects, question = torch.randn(2, 5, D), torch.randn(2, D)
    first = torch.nn.Linear(3 * D, 16)
    with torch.no_grad():
        first.weight.copy_(torch.cat([rn.left.weight, rn.right.weight, rn.question.weight], dim=1))
        first.bias.copy_(rn.left.bias)
    pairs = torch.cat([objects[:, :, None].expand(-1, -1, 5, -1), objects[:, None].expand(-1, 5, -1, -1),
                       question[:, None, None].expand(-1, 5, 5, -1)], dim=-1)  # (B, N, N, 3D)
    expected = rn.f(rn.g(torch.relu(first(pairs))).sum(dim=(1, 2)))
    _, pooled, _ = rn({"image": Encoded(objects, objects.mean(1)), "text": Encoded(None, question)}, {})
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_late_fusion_modes():
    torch.manual_seed(0)
    encoded = {"image": Encoded(None, torch.randn(4, D)), "text": Encoded(None, torch.randn(4, D)),
               "audio": Encoded(None, torch.randn(4, D))}
    weighted = LateFusion(D, "sum")
    with torch.no_grad():
        weighted.logits.copy_(torch.tensor([0.0, 100.0]))
    assert torch.allclose(weighted(encoded, {}).pooled, encoded["text"].pooled, atol=1e-5), "softmax weights pick text"
    for modalities in (("image", "text"), ("image", "text", "audio")):
        out = LateFusion(D, "gated", modalities)(encoded, {}).pooled
        assert out.shape == (4, D) and out.abs().max() <= 1.0, "a convex mix of tanh features"
    with pytest.raises(ValueError, match="mode"):
        LateFusion(D, "product")


def test_hybrid_sums_its_fusions():
    torch.manual_seed(0)
    early, late = EarlyFusion(D, depth=1, heads=2), LateFusion(D, "concat")
    hybrid = HybridFusion([early, late])
    args = ({"image": Encoded(torch.randn(2, 9, D), torch.randn(2, D)),
             "text": Encoded(torch.randn(2, 5, D), torch.randn(2, D), torch.ones(2, 5, dtype=torch.bool))}, {})
    tokens, pooled, _ = hybrid(*args)
    assert torch.allclose(pooled, early(*args).pooled + late(*args).pooled, atol=1e-6)
    assert torch.equal(tokens, early(*args).tokens)


def test_backbone_without_fusion_or_an_encoder_says_which_task_needs_it():
    task = soc_task("vqa", Shards(train="unused"))
    task.name = "vqa"
    with pytest.raises(ValueError, match=r"model.tasks.vqa: the task needs model.backbone.init_args.fusion"):
        task.build(_backbone())  # a dual encoder
    with pytest.raises(ValueError, match=r"model.tasks.vqa: the task reads text, but model.backbone.init_args.encoders "
                                         r"has no 'text' \(it has image\)"):
        task.build(Backbone({"image": IMAGE["cnn"]()}))
    with pytest.raises(ValueError, match="one dim"):
        Backbone({"image": IMAGE["cnn"](), "text": LSTMTextEncoder(256, 2 * D)})
    with pytest.raises(ValueError, match=r"fuses audio, but model.backbone.init_args.encoders has no audio"):
        Backbone({"image": IMAGE["cnn"](), "text": TEXT["transformer"]()}, LateFusion(D, modalities=("audio", "text")))
    with pytest.raises(ValueError, match=r"init_args.image_encoder: .* model.backbone.init_args.encoders.image"):
        Backbone({"text": TEXT["transformer"]()}, image_encoder=IMAGE["cnn"]())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_image_encoder_loads_timm_weights_from_a_local_file(suffix, tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", num_classes=0)
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    encoder = TimmImageEncoder("test_efficientnet", dim=D, image_size=75, feature_index=3, pretrained=str(path))
    loaded = encoder.model.state_dict()
    assert loaded and all(torch.equal(loaded[k], state[k]) for k in loaded)
    fresh = TimmImageEncoder("test_efficientnet", dim=D, image_size=75, feature_index=3)
    assert not all(torch.equal(fresh.model.state_dict()[k], state[k]) for k in loaded)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_image_encoder_refuses_a_pickled_object_in_a_torch_weights_file(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"stem.conv.weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        TimmImageEncoder("test_efficientnet", dim=D, image_size=75, feature_index=3, pretrained=str(path))



def test_a_vit_dual_encoder_learns_with_flatten_pooling(soc):
    """The ViT CLIP collapse (loss stuck at ln(batch) at the recipe's learning rate): every Sort-of-CLEVR image
    holds the same six colours, so the mean of a fresh ViT's patch tokens hardly depends on the image, and AdamW at
    2e-3 makes it a constant (measured on this batch: 2.77 = ln 16 after 40 steps; at 2e-4 it learns, slowly: 1.69).
    Flatten pooling keeps each patch in its place and learns at 2e-3."""
    torch.manual_seed(0)
    batch_size = 16
    backbone = Backbone({"image": TimmImageEncoder("vit_tiny_patch16_224", dim=D, image_size=75, pooling="flatten",
                                                   model_kwargs={"img_size": 75, "patch_size": 15, "embed_dim": 32,
                                                                 "depth": 2, "num_heads": 2}),
                         "text": TEXT["transformer"]()})
    task = Contrastive(Shards(train=soc["train"]), batch_size=batch_size, caption_field="json.caption", embed_dim=D,
                       transform=ImageTransform(augment=False, crop_pct=1.0, interpolation="bilinear"))
    task.build(backbone)
    stream = TaskStream(task, scan_shards(soc["shards"]["train"], "k"), load_tokenizer(soc["tokenizer"]),
                        batch_size=batch_size, train=True, seed=0, shuffle_buffer=32)
    _, batch, _ = next(iter(stream))
    optimizer = torch.optim.AdamW([*backbone.parameters(), *task.parameters()], lr=2e-3)
    for _ in range(40):
        loss = task(backbone, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * math.log(batch_size), loss.item()  # measured: 0.09


def test_cross_attention_reads_each_image_once_and_equals_the_decoder_per_text():
    """Grouping an image's texts into one cross-attention changes no number: the result is the plain
    ``nn.TransformerDecoder`` over each text and its own copy of the image, for texts in any order."""
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(D, depth=2, heads=2).eval()
    images, texts = torch.randn(3, 9, D), torch.randn(7, 5, D)
    image_index = torch.tensor([2, 0, 2, 1, 2, 0, 2])  # image 2 has four texts, image 1 one
    mask = torch.ones(7, 5, dtype=torch.bool)
    mask[1, 3:] = mask[4, 1:] = False
    text = Encoded(texts, texts.mean(1), mask)
    tokens, pooled, _ = fusion({"image": Encoded(images, images.mean(1)), "text": text}, {"image": image_index})
    reference = fusion.layers(texts, images[image_index], tgt_key_padding_mask=~mask)
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    one_each, _, _ = fusion({"image": Encoded(images[image_index], images.mean(1)[image_index]), "text": text}, {})
    torch.testing.assert_close(one_each, reference, rtol=1e-5, atol=1e-5)
    assert pooled.shape == (7, D)


def test_cross_attention_grid_starts_as_plain_and_biases_by_distance_from_the_last_focus():
    """``grid``: with its scales at zero the fusion is the plain one, initialisation and padded cells included; a scale
    biases each cell by its distance in cells from where a head of the layer before attended, by as much as the query
    token says, for each image of the batch and each head on its own."""
    torch.manual_seed(0)
    plain = CrossAttentionFusion(D, depth=2, heads=2).eval()
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(D, depth=2, heads=2, grid=(3, 3)).eval()
    images, texts = torch.randn(2, 9, D), torch.randn(3, 4, D)
    cells = torch.ones(2, 9, dtype=torch.bool)
    cells[1, 6:] = False  # image 1's last row is padding
    encoded = {"image": Encoded(images, images.mean(1), cells), "text": Encoded(texts, texts.mean(1))}
    index = {"image": torch.tensor([0, 1, 1])}
    torch.testing.assert_close(fusion(encoded, index), plain(encoded, index))
    with torch.no_grad():
        fusion.scales[0, 1, 0, 0] = -2.0  # head 1: minus twice the distance from head 0's focus, times query feature 0
    focus = torch.full((2, 2, 2, 9), 1 / 9)  # (images, heads before, tokens, cells); head 1's focus has no scale
    focus[:, 0] = 0.0
    focus[0, 0, 0, 0] = 1.0  # image 0, token 0: head 0 attended the top-left cell
    focus[0, 0, 1, 4] = focus[0, 0, 1, 5] = 0.5  # token 1: halfway between the centre and the cell to its right
    focus[1, 0, :, 8] = 1.0  # image 1: the bottom-right cell
    query = torch.zeros(2, 2, D)
    query[:, :, 0] = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    bias = fusion._distance_bias(query, focus, 0).view(2, 2, 2, 3, 3)  # (images, heads, tokens, rows, columns)
    assert torch.equal(bias[:, 0], torch.zeros(2, 2, 3, 3))

    def distance(squared):
        return (torch.tensor(squared) + 1e-6).sqrt()

    torch.testing.assert_close(bias[0, 1, 0], -2.0 * distance([[0.0, 1, 4], [1, 2, 5], [4, 5, 8]]))
    torch.testing.assert_close(bias[0, 1, 1, 1], -1.0 * distance([2.25, 0.25, 0.25]))
    torch.testing.assert_close(bias[1, 1, 0], torch.zeros(3, 3))  # its query feature is 0
    torch.testing.assert_close(bias[1, 1, 1], -2.0 * distance([[8.0, 5, 4], [5, 2, 1], [4, 1, 0]]))
    moved = fusion(encoded, index)
    assert not torch.allclose(moved.pooled, plain(encoded, index).pooled) and torch.isfinite(moved.tokens).all()
    with pytest.raises(ValueError, match="grid"):
        fusion({"image": Encoded(images[:, :8], images.mean(1)), "text": encoded["text"]}, index)
    with pytest.raises(ValueError, match="depth >= 2"):
        CrossAttentionFusion(D, depth=1, heads=2, grid=(3, 3))


def test_backbone_refuses_a_fusion_grid_unlike_its_encoders():
    """The fusion's ``grid`` must be the image encoder's: 20x5 has the 100 cells of a 10x10 grid, but other distances."""
    with pytest.raises(ValueError, match=r"grid: \[20, 5\], but the image encoder's grid is \[10, 10\]"):
        _backbone(image="cnn_coordinates", fusion=CrossAttentionFusion(D, depth=2, heads=2, grid=(20, 5)))
    _backbone(image="cnn_coordinates", fusion=CrossAttentionFusion(D, depth=2, heads=2, grid=(10, 10)))  # matches


def test_cross_attention_trains_with_grid_distance(soc):
    """The distance scales get a gradient through the attention of the layer they bias, and the model learns."""
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(D, depth=2, heads=2, grid=(10, 10))
    _trains_down(_backbone(image="cnn_coordinates", fusion=fusion), soc)
    assert fusion.scales.abs().sum() > 0
