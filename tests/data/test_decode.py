"""Decoding samples: only the entries a task's fields read, images only as the format their name says, a pixel limit."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
from PIL import Image, features

from mmlit.data.decode import IMAGE_EXTENSIONS, SampleError, UnsafeSampleError, decode_sample, sample_field, sample_image
from mmlit.modalities import ImageModality


def _image(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


def _sample(**entries: bytes) -> dict:
    return {"__key__": "k0", "__url__": "s-000000.tar", **{name.replace("_", "."): data for name, data in entries.items()}}


def test_fields_keep_only_the_entries_they_read_and_drop_unsafe_ones_unread():
    sample = _sample(png=_image("PNG"), json=b'{"a": {"b": 7}}', pth=pickle.dumps({"x": 1}), bin=b"\x00\x01",
                     txt=b"\xff not utf-8", extra_json=b"{not json")
    decoded = decode_sample(sample, ("image", "json.a.b"))
    assert set(decoded) == {"__key__", "__url__", "png", "json"}
    assert sample_field(decoded, "json.a.b", "t") == 7 and sample_image(decoded, "t").size == (8, 8)


def test_unread_entries_are_not_decoded():
    sample = _sample(json=b'{"a": 1}', extra_json=b"{not json")
    assert decode_sample(sample, ("json.a",))["json"] == {"a": 1}  # 'extra.json' is never parsed
    with pytest.raises(SampleError, match=r"s-000000.tar: sample 'k0': cannot decode entry 'extra.json'"):
        decode_sample(sample)  # no fields: every entry, as before


@pytest.mark.parametrize("fields", [None, (), ("pth",), ("image", "pth.state")])
def test_a_field_that_reads_an_unsafe_entry_is_refused(fields):
    with pytest.raises(UnsafeSampleError, match=r"sample 'k0': refusing entry 'pth'"):
        decode_sample(_sample(png=_image("PNG"), pth=pickle.dumps({"x": 1})), fields)


def test_entry_names_with_dots():
    sample = _sample(png=_image("PNG"), seg_png=_image("PNG", (4, 4)), json=b'{"q": [1, 2]}')
    decoded = decode_sample(sample, ("seg.png", "json.q"))
    assert set(decoded) == {"__key__", "__url__", "seg.png", "json"}  # 'png' is no image field's here
    assert sample_field(decoded, "seg.png", "t").size == (4, 4) and sample_field(decoded, "json.q", "t") == [1, 2]
    assert sample_field(decoded, "json.q.1", "t") == 2  # a number indexes a list
    with pytest.raises(SampleError, match=r"task 't' needs 'json.q.r', which is missing"):
        sample_field(decoded, "json.q.r", "t")
    with pytest.raises(SampleError, match=r"task 't' needs 'json.q.2', which is missing"):
        sample_field(decoded, "json.q.2", "t")
    with pytest.raises(SampleError, match=r"task 't' needs the entry '.txt'"):
        sample_field(decoded, "txt", "t")


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_each_image_extension_decodes_its_own_format(ext):
    fmt = Image.registered_extensions()[f".{ext}"]
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    image = decode_sample(_sample(**{ext: _image(fmt)}), ("image",))[ext]
    assert image.format == fmt and image.size == (8, 8)


@pytest.mark.parametrize("fmt,ext", [("TIFF", "png"), ("ICO", "png"), ("PCX", "png"), ("EPS", "png"), ("BMP", "jpg"),
                                     ("PNG", "jpg")])
def test_image_in_another_format_than_its_name_is_a_sample_error(fmt, ext):
    with pytest.raises(SampleError, match=rf"sample 'k0': cannot decode entry '{ext}': it holds {fmt} data, not the "
                                          rf"\w+ its \.{ext} name says"):
        decode_sample(_sample(**{ext: _image(fmt)}), ("image",))


def test_unknown_bytes_under_an_image_name_are_a_sample_error():
    with pytest.raises(SampleError, match=r"entry 'png': it holds data of a format Pillow cannot tell"):
        decode_sample(_sample(png=b"plain text"))


def test_pixel_limit_refuses_before_the_pixels_are_decoded():
    data = _image("PNG", (100, 50))
    assert decode_sample(_sample(png=data), max_image_pixels=5000)["png"].size == (100, 50)
    truncated = data[:60]  # the header says 100x50; the pixel data is cut off
    with pytest.raises(SampleError, match=r"entry 'png': 100x50 = 5000 pixels, more than data.max_image_pixels \(4999\)"):
        decode_sample(_sample(png=truncated), max_image_pixels=4999)  # not the truncation: load() never ran
    with pytest.raises(SampleError, match=r"cannot decode entry 'png'"):
        decode_sample(_sample(png=truncated), max_image_pixels=5000)


def test_the_given_modalities_decode_also_without_fields():
    """Without fields every entry is decoded, by the run's modality objects (their limits) where one is given."""
    sample = _sample(png=_image("PNG", (100, 50)), txt=b"a caption")
    with pytest.raises(SampleError, match=r"5000 pixels, more than data.max_image_pixels \(4999\)"):
        decode_sample(sample, modalities={"image": ImageModality(max_pixels=4999)})
    decoded = decode_sample(sample, modalities={"image": ImageModality(max_pixels=5000)})
    assert decoded["png"].size == (100, 50) and decoded["txt"] == "a caption"


def test_the_recipe_limit_governs_over_pillows(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the run's 100x50 images are "bombs" to Pillow
    data = _image("PNG", (100, 50))
    with pytest.raises(SampleError, match=r"decompression bomb"):
        decode_sample(_sample(png=data))  # no recipe limit: Pillow's applies
    with pytest.raises(SampleError, match=r"entry 'png': more pixels than data.max_image_pixels \(10\) allows"):
        decode_sample(_sample(png=data), max_image_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == 1000  # a stricter recipe limit leaves Pillow's alone
    with pytest.raises(SampleError, match=r"entry 'png': 100x50 = 5000 pixels, more than data.max_image_pixels \(3000\)"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's, for an image over both limits
        decode_sample(_sample(png=data), max_image_pixels=3000)  # a looser one raises Pillow's to it
    assert Image.MAX_IMAGE_PIXELS == 3000
    decode_sample(_sample(png=_image("PNG", (10, 10))), max_image_pixels=2000)
    assert Image.MAX_IMAGE_PIXELS == 3000  # and never lowers it
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert decode_sample(_sample(png=data), max_image_pixels=5000)["png"].size == (100, 50)
