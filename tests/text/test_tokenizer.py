import json

import pytest

from mmlit.text import BOS, EOS, PAD, SPECIAL_TOKENS, load_tokenizer, train_tokenizer


def test_round_trip_and_special_ids(soc):
    tokenizer = load_tokenizer(soc["tokenizer"])
    text = "what is the shape of the object closest to the red object?"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert PAD not in ids and BOS not in ids and EOS not in ids
    assert tokenizer.decode(ids) == text
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD, 1, BOS, EOS]


def test_unknown_word_does_not_break_encoding(soc):
    tokenizer = load_tokenizer(soc["tokenizer"])
    assert len(tokenizer.encode("a purple hexagon", add_special_tokens=False).ids) > 0


def test_missing_file_names_the_recipe_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.tokenizer: no tokenizer at"):
        load_tokenizer(tmp_path / "nope.json")


def test_foreign_tokenizer_without_mmlit_special_ids_is_refused(tmp_path):
    path = tmp_path / "tok.json"
    train_tokenizer(["hello world"] * 3, path, vocab_size=50)
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["[PAD]"], vocab["[EOS]"] = vocab["[EOS]"], vocab["[PAD]"]
    for token in data["added_tokens"]:
        token["id"] = vocab[token["content"]]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"must give \[PAD\] the id 0"):
        load_tokenizer(path)
