"""The audio and video modalities: decoding checked by content and within limits, resampling, log-mels equal to the
reference filterbank, seeded augmentation, frame sampling with one augmentation per clip; their encoders."""

from __future__ import annotations

import io
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from mmlit.data.collate import Padded
from mmlit.data.decode import decode_sample, sample_input
from mmlit.data.transforms import ImageTransform, sample_context
from mmlit.modalities.audio import AudioModality, AudioTransform, decode_audio, log_mel, mel_filters
from mmlit.modalities.video import VideoModality, decode_video, sample_frames
from mmlit.models import Backbone, SpectrogramTransformer, VideoEncoder


def encode_audio(samples: np.ndarray, rate: int, fmt: str = "flac") -> bytes:
    """Mono float samples -> FLAC or WAV bytes (s16), by PyAV."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream("flac" if fmt == "flac" else "pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in (*stream.encode(frame), *stream.encode(None)):
            container.mux(packet)
    return buffer.getvalue()


def encode_video(frames: np.ndarray, fmt: str = "mp4") -> bytes:
    """(T, H, W, 3) uint8 -> an H.264 clip at 8 fps, by PyAV."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264" if fmt == "mp4" else "libvpx-vp9", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def moving_square(frames: int = 8, size: int = 32) -> np.ndarray:
    clip = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        clip[t, 12:18, 2 + 3 * t:8 + 3 * t] = (255, 0, 0)
    return clip


def test_mel_filters_equal_the_reference_filterbank():
    """torchaudio's ``melscale_fbanks`` (HTK, no norm), as ``transformers`` computes it (which matches torchaudio)."""
    from transformers.audio_utils import mel_filter_bank

    for n_freqs, n_mels, rate, f_max in ((201, 64, 16000, None), (257, 80, 22050, 8000.0), (1025, 128, 44100, None)):
        ours = mel_filters(n_freqs, n_mels, rate, 0.0, f_max)
        reference = mel_filter_bank(n_freqs, n_mels, 0.0, f_max or rate / 2, rate, norm=None, mel_scale="htk")
        assert torch.allclose(ours.double(), torch.from_numpy(reference), atol=1e-6)


def test_audio_is_decoded_to_mono_at_the_recipes_rate_and_its_pitch_kept():
    data = encode_audio(sine(440.0, 0.5, 22050), 22050)
    audio = decode_audio("flac", data, 16000)
    assert audio.sample_rate == 16000 and abs(len(audio.samples) - 8000) <= 64
    spectrum = torch.fft.rfft(audio.samples[1000:7000]).abs()
    assert abs(spectrum.argmax().item() * 16000 / 6000 - 440.0) < 4  # the resampled tone is still 440 Hz
    wav = decode_audio("wav", encode_audio(sine(440.0, 0.5, 16000), 16000, "wav"), 16000)
    assert torch.allclose(wav.samples, torch.from_numpy(sine(440.0, 0.5, 16000)), atol=1e-4)


def test_audio_is_checked_by_content_and_length():
    flac = encode_audio(sine(300.0, 2.0, 16000), 16000)
    wav = encode_audio(sine(300.0, 2.0, 16000), 16000, "wav")
    with pytest.raises(ValueError, match="not FLAC"):
        decode_audio("flac", wav)
    with pytest.raises(ValueError, match="not WAV"):
        decode_audio("wav", flac)
    with pytest.raises(ValueError, match="limit of 1.5 s"):
        decode_audio("flac", flac, max_seconds=1.5)
    with pytest.raises(ValueError, match="FFmpeg cannot decode"):
        decode_audio("flac", flac[:4] + bytes(200))
    # a FLAC that does not say its length (STREAMINFO's total samples 0): the limit stops the decoding itself
    unknown = bytearray(flac)
    fields = int.from_bytes(unknown[18:26], "big") & ~((1 << 36) - 1)
    unknown[18:26] = fields.to_bytes(8, "big")
    assert decode_audio("flac", bytes(unknown)).seconds == pytest.approx(2.0, abs=0.01)
    with pytest.raises(ValueError, match="lasts more than the limit of 1.5 s"):
        decode_audio("flac", bytes(unknown), max_seconds=1.5)
    # in a sample: a counted skip (SampleError), and the recipe's limit reaches the modality
    sample = {"__key__": "k", "__url__": "u", "flac": flac}
    with pytest.raises(ValueError, match="limit of 1.0 s"):
        decode_sample(sample, ("audio",), modalities={"audio": AudioModality(max_seconds=1.0)})


def test_an_entry_named_by_a_field_is_decoded_by_its_modality_and_the_main_entry_comes_first():
    sample = {"__key__": "k", "question0.flac": encode_audio(sine(200.0, 0.2, 16000), 16000),
              "flac": encode_audio(sine(300.0, 0.4, 16000), 16000), "json": b"{}"}
    decoded = decode_sample(sample, ("question0.flac", "json"))
    assert "flac" not in decoded and decoded["question0.flac"].seconds == pytest.approx(0.2, abs=0.01)
    every = decode_sample(sample, ("audio",))
    assert sample_input(every, "audio", "t").seconds == pytest.approx(0.4, abs=0.01)  # ``flac``, not question0


def test_log_mels_and_their_augmentation_are_seeded_per_sample():
    audio = decode_audio("flac", encode_audio(sine(500.0, 1.0, 16000), 16000))
    features = log_mel(audio.samples, 16000)
    assert features.shape == (64, 101)  # one frame per 10 ms, centred
    assert features.max() - features.min() == pytest.approx(2.0)  # Whisper's: floored 8 below the top, / 4
    pipeline = AudioModality().pipeline(None, AudioTransform(), "k")

    def draw(key: str, train: bool = True) -> torch.Tensor:
        with sample_context((0, 1, 0, key), train=train):
            return pipeline(audio)

    assert torch.equal(draw("a"), draw("a")) and not torch.equal(draw("a"), draw("b"))
    assert torch.equal(draw("a", train=False), draw("b", train=False))
    assert torch.allclose(draw("a", train=False), features)


def test_video_is_decoded_checked_and_sampled():
    clip = moving_square()
    data = encode_video(clip)
    decoded = decode_video("mp4", data)
    assert decoded.frames.shape == (8, 32, 32, 3) and decoded.fps == 8.0
    assert np.abs(decoded.frames.astype(int) - clip).mean() < 4  # H.264 at its default quality
    assert decode_video("mp4", data, keep_frames=4).frames.shape[0] == 4  # evenly spaced of a longer clip
    with pytest.raises(ValueError, match="limit of 4"):
        decode_video("mp4", data, max_frames=4)
    with pytest.raises(ValueError, match="limit of 100 pixels"):
        decode_video("mp4", data, max_pixels=100)
    webm = encode_video(clip, "webm")
    with pytest.raises(ValueError, match="not MP4"):
        decode_video("mp4", webm)
    assert decode_video("webm", webm).frames.shape == (8, 32, 32, 3)
    thinned = decode_video("webm", webm, keep_frames=4).frames  # (WebM does not say its frame count: thinned as read)
    assert np.array_equal(thinned, decode_video("webm", webm).frames[::2])
    assert sample_frames(8, 4, train=False) == [1, 3, 5, 7]
    with sample_context((0, 0, 0, "k"), train=True):
        drawn = sample_frames(80, 8, train=True)
    assert all(10 * i <= f < 10 * (i + 1) for i, f in enumerate(drawn))


def test_a_clip_takes_one_augmentation_for_all_its_frames():
    still = np.repeat(moving_square()[:1], 8, axis=0)  # the same frame 8 times
    clip = decode_video("mp4", encode_video(still))
    encoder = SimpleNamespace(frames=8, frame_encoder=SimpleNamespace(image_size=24))  # what the pipeline reads
    settings = ImageTransform(scale=(0.3, 1.0), hflip=0.5, auto_augment="rand-m9-n2-mstd0.5")  # (NumPy draws too)
    pipeline = VideoModality().pipeline(encoder, settings, "k")
    outs = []
    for key in ("a", "b", "c"):
        with sample_context((0, 0, 0, key), train=True):
            frames = pipeline(clip)
        assert frames.shape == (8, 3, 24, 24)
        assert all(torch.equal(frames[0], f) for f in frames[1:]), "the crop moved between frames"
        outs.append(frames[0])
    assert not all(torch.equal(outs[0], o) for o in outs[1:]), "every clip drew the same crop"


def test_the_spectrogram_transformer_reads_a_clip_alike_whatever_is_padded_beside_it(tmp_path):
    torch.manual_seed(0)
    encoder = SpectrogramTransformer(dim=32, max_frames=200, model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    long, short = torch.randn(64, 120), torch.randn(64, 57)
    both = encoder(Padded.of([long, short]))
    alone = encoder(Padded.of([short]))
    assert both.tokens.shape == (2, 30, 32) and both.mask.sum(1).tolist() == [30, 15]
    assert torch.allclose(both.pooled[1], alone.pooled[0], atol=1e-5)
    assert torch.allclose(both.tokens[1, :15], alone.tokens[0], atol=1e-5)
    with pytest.raises(ValueError, match="max_frames=200"):
        encoder(Padded.of([torch.randn(64, 260)]))
    # the encoder's own pass through the ViT (positions cropped, not interpolated) is timm's forward_features for a
    # clip of max_frames: this fails if timm's ViT changes the steps it is made of
    full = torch.randn(1, 64, 200)
    timm_tokens = encoder.norm(encoder.proj(encoder.model.forward_features(full[:, None])[:, encoder.prefix:]))
    assert torch.allclose(encoder(full).tokens, timm_tokens, atol=1e-5)
    # weights from a local file of an image ViT: its blocks are loaded, its RGB patch embedding made one channel
    import timm
    from safetensors.torch import save_file

    image_vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2, embed_dim=32, num_heads=2)
    save_file(image_vit.state_dict(), str(tmp_path / "vit.safetensors"))
    audio = SpectrogramTransformer(dim=32, max_frames=200, pretrained=str(tmp_path / "vit.safetensors"),
                                   model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    assert torch.equal(audio.model.blocks[1].attn.qkv.weight, image_vit.blocks[1].attn.qkv.weight)
    assert audio.model.patch_embed.proj.weight.shape == (32, 1, 64, 4)


def test_the_video_encoder_relates_frames_and_the_backbone_encodes_a_padded_batch_once():
    video = VideoEncoder(dim=32, frames=4, frame_encoder={"model_name": "resnet10t", "image_size": 32})
    out = video(torch.randint(0, 255, (2, 4, 3, 32, 32), dtype=torch.uint8))
    assert out.tokens.shape == (2, 4, 32) and out.pooled.shape == (2, 32)
    with pytest.raises(ValueError, match="frames=4"):
        video(torch.zeros(2, 3, 3, 32, 32, dtype=torch.uint8))
    audio = SpectrogramTransformer(dim=32, max_frames=100, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    backbone = Backbone({"audio": audio, "video": video})
    batch = Padded.of([torch.randn(64, 40), torch.randn(64, 20)])
    calls = []
    audio.register_forward_hook(lambda *a: calls.append(1))
    with backbone.shared_pass():
        first = backbone.encode("audio", batch)
        again = backbone.encode("audio", Padded(*batch))  # a new tuple of the same tensors, as after the move
    assert first is again and len(calls) == 1


def test_settings_are_checked():
    from mmlit.data.datamodule import _modalities

    with pytest.raises(ValueError, match="max_frames=1001"):
        SpectrogramTransformer(dim=32, max_frames=1001, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    with pytest.raises(ValueError, match="pooling: flatten"):
        VideoEncoder(dim=32, frames=2, tokens="grid", frame_encoder={"model_name": "resnet10t", "image_size": 32,
                                                                    "pooling": "flatten"})
    with pytest.raises(ValueError, match="data.max_image_pixels"):
        _modalities({}, None, "worker", {"image": {"max_pixels": 10}})
    with pytest.raises(ValueError, match="data.modalities.audio: the modality's arguments"):
        _modalities({}, None, "worker", {"audio": 16000})
    with pytest.raises(ValueError, match="data.modalities.sound: no modality"):
        _modalities({}, None, "worker", {"sound": {}})
    with pytest.raises(ValueError, match="keep_frames"):
        VideoModality(keep_frames=0)


def test_equal_values_of_tasks_are_shared_under_any_key():
    """A clip that one task reads as ``audio`` and another as its ``caption`` reaches the model once."""
    from mmlit.data.stream import _share_equal

    values = [torch.randn(64, 30), torch.randn(64, 20)]
    batches = _share_equal({"a": {"audio": Padded.of(values)},
                            "b": {"caption": Padded.of(values), "other": torch.ones(2)},
                            "c": {"audio": Padded.of(values[:1])}})
    assert batches["b"]["caption"] is batches["a"]["audio"]
    assert batches["c"]["audio"] is not batches["a"]["audio"]
