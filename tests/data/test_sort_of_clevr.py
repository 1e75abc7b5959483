import io
import json
import math

import numpy as np
import webdataset as wds
from PIL import Image

from mmlit.data import sort_of_clevr as soc


def test_sample_is_a_pure_function_of_seed_split_and_index():
    assert soc.make_sample(0, "train", 5) == soc.make_sample(0, "train", 5)
    assert soc.make_sample(0, "train", 5)["json"] != soc.make_sample(0, "val", 5)["json"]
    assert soc.make_sample(0, "train", 5)["json"] != soc.make_sample(1, "train", 5)["json"]


def test_scene_has_one_object_per_colour_without_overlap():
    for index in range(20):
        objects = soc.make_scene(np.random.default_rng(index))
        assert [o.colour for o in objects] == list(soc.COLOURS)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                assert math.dist((a.x, a.y), (b.x, b.y)) >= 2 * soc.OBJECT_HALF_SIZE * math.sqrt(2) - 1e-6


def test_answers_follow_from_the_scene():
    sample = soc.make_sample(3, "train", 7)
    ann = json.loads(sample["json"])
    objects = {o["colour"]: o for o in ann["objects"]}
    assert len(ann["questions"]) == 20
    assert [q["relational"] for q in ann["questions"]] == [False] * 10 + [True] * 10
    for q in ann["questions"]:
        colour = next(c for c in soc.COLOURS if f" {c} " in q["question"])
        me = objects[colour]
        others = [o for o in objects.values() if o is not me]
        dist = [math.dist((me["x"], me["y"]), (o["x"], o["y"])) for o in others]
        expected = {
            "shape": me["shape"],
            "horizontal": "left" if me["x"] < 37.5 else "right",
            "vertical": "top" if me["y"] < 37.5 else "bottom",
            "closest": others[int(np.argmin(dist))]["shape"],
            "furthest": others[int(np.argmax(dist))]["shape"],
            "count": str(sum(o["shape"] == me["shape"] for o in objects.values())),
        }[q["type"]]
        assert q["answer"] == expected, q
        assert q["answer"] in soc.ANSWERS
    assert ann["labels"]["n_circles"] == sum(o["shape"] == "circle" for o in objects.values())
    assert ann["caption"].split(" , ")[0].startswith("red ")


def test_image_shows_the_objects_in_their_colours():
    sample = soc.make_sample(0, "test", 0)
    image = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert image.shape == (75, 75, 3)
    for o in json.loads(sample["json"])["objects"]:
        assert tuple(image[round(o["y"]), round(o["x"])]) == soc.COLOURS[o["colour"]]


def test_write_split_shards_and_prefix_property(tmp_path):
    paths = soc.write_split(tmp_path, "train", 25, shard_size=10)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    keys = [s["__key__"] for s in wds.tarfile_samples({"url": p} for p in paths)]
    assert keys == [f"train{i:07d}" for i in range(25)]
    small = soc.write_split(tmp_path / "small", "train", 5, shard_size=10)
    first = next(iter(wds.tarfile_samples([{"url": small[0]}])))
    assert first["json"] == soc.make_sample(0, "train", 0)["json"]


def test_full_preset_has_10000_images():
    assert sum(soc.PRESETS["full"].values()) == 10_000


def test_shards_are_byte_for_byte_reproducible(tmp_path):
    first = soc.write_split(tmp_path / "a", "val", 7, shard_size=5)
    second = soc.write_split(tmp_path / "b", "val", 7, shard_size=5)
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in second]
