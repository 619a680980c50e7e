"""Talking avatar: window arithmetic, scheduler, audio front end, colour matching, end to end, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from skyreels_diffusers import SkyReelsV3FlowEulerScheduler
from skyreels_diffusers.app.tiny import TINY_WAV2VEC2_CONFIG, tiny_pipeline
from skyreels_diffusers.pipelines.audio_io import audio_windows, load_speech, loudness_normalize, wav2vec2_features
from skyreels_diffusers.pipelines.buckets import avatar_bucket_size
from skyreels_diffusers.pipelines.color import lab_to_rgb, match_colors, rgb_to_lab
from skyreels_diffusers.pipelines.pipeline_skyreels_v3_talking_avatar import AvatarRun, extend_audio, plan_windows
from tests.helpers import FIXTURES, random_image


SMALL = dict(height=32, width=48)


def speech_wave(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def avatar(**kwargs):
    pipe = tiny_pipeline("talking_avatar")
    pipe.set_progress_bar_config(disable=True)
    args = dict(
        image=random_image(60, 40), prompt="a woman talks", generator=torch.Generator().manual_seed(0), **SMALL
    )
    return pipe, pipe(**{**args, **kwargs})


def features(frames: int, seed: int = 0) -> torch.Tensor:
    cfg = TINY_WAV2VEC2_CONFIG
    return torch.randn(
        frames, cfg["num_hidden_layers"], cfg["hidden_size"], generator=torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------------------------------------- window arithmetic
def test_worked_example_of_plan_windows():
    """The worked example of `plan_windows`' docstring, 10 s of audio: windows at 0/64/128/192, kept
    69+64+64+76 = 273 frames, trimmed to 250."""
    plan = plan_windows(250)
    assert plan.video_length == 273
    assert plan.keyframes == [24, 42, 61, 80]
    assert plan.starts == [0, 64, 128, 192]
    assert plan.kept == [69, 64, 64, 76] and sum(plan.kept) == 273


@pytest.mark.parametrize(
    "frames, length, starts, kept",
    [
        (80, 80, [], []),  # fewer than 81: the keyframe clip is the video
        (81, 81, [0], [81]),  # exactly one window
        (145, 145, [0, 64], [69, 76]),  # 81 + 64
        (146, 209, [0, 64, 128], [69, 64, 76]),  # 81 + 64 + 1: padded to the next window
    ],
)
def test_window_boundaries(frames, length, starts, kept):
    plan = plan_windows(frames)
    assert (plan.video_length, plan.starts, plan.kept) == (length, starts, kept)
    assert sum(kept) in (0, length)


@pytest.mark.parametrize("frames", [40, *(pytest.param(n, marks=pytest.mark.slow) for n in (81, 145, 146))])
def test_end_to_end_frame_counts_at_the_boundaries(frames):
    _, out = avatar(audio_embeds=features(frames))
    assert out.frames.shape == (1, frames, 32, 48, 3)
    assert out.fps == 25 and out.audio is None


@pytest.mark.parametrize("frames", [40, 81, 145, 146, 250, 5000])
def test_the_clips_cover_the_video_once_and_decode_only_what_they_keep(frames):
    """The loop's plan: the keyframe clip keeps the frames the windows end on (the whole video when there are no
    windows); the windows' new frames follow each other up to `num_frames`; a window decodes its first 69 frames
    (the last one up to the end of the video) and keeps the previous window's 5 motion frames out of the video."""
    plan = plan_windows(frames)
    clips = plan.clips()
    assert [c.index for c in clips] == list(range(len(clips))) and clips[0].window is None
    new = [(c.start + c.keep[0], len(c.keep)) for c in clips if c.new_video]
    assert sum(n for _, n in new) == frames and [s for s, _ in new] == list(np.cumsum([0] + [n for _, n in new])[:-1])
    if not plan.starts:
        assert clips[0].keep == tuple(range(frames)) and len(clips) == 1
        return
    assert clips[0].keep == tuple(sorted(set(plan.keyframes))) and not clips[0].new_video
    for clip in clips[1:-1]:
        assert clip.keep[0] == (0 if clip.window == 0 else 5) and clip.num_decoded == 69  # 12 frames never decoded
    assert clips[-1].num_decoded == frames - clips[-1].start  # the padding past the audio is not decoded


def test_decoding_the_kept_latent_frames_gives_the_first_frames_of_the_whole_decode():
    """What lets a window decode 18 of its 21 latent frames: the VAE is causal in time, so the frames it keeps are
    the same bits either way (here the tiny VAE on the CPU; bench/avatar_run.py checks the real one on the GPU)."""
    from skyreels_diffusers.app.tiny import tiny_components

    vae = tiny_components("talking_avatar")["vae"]
    latents = torch.randn(1, 16, 21, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, kept = vae.decode(latents).sample, vae.decode(latents[:, :, :18]).sample
    assert whole.shape[2] == 81 and kept.shape[2] == 69
    assert torch.equal(whole[:, :, :69], kept)


def test_colour_matching_is_frame_by_frame():
    """What lets only the kept frames be colour-matched: each frame is matched on its own statistics."""
    g = torch.Generator().manual_seed(2)
    frames, reference = torch.rand(81, 3, 16, 24, generator=g) * 2 - 1, torch.rand(3, 16, 24, generator=g) * 2 - 1
    whole = match_colors(frames, reference)
    assert torch.equal(whole[5:69], match_colors(frames[5:69], reference))
    assert torch.equal(whole[[24, 42, 80]], match_colors(frames[[24, 42, 80]], reference))


def test_audio_padding_is_time_reversed_and_windows_clamp():
    x = torch.arange(6.0)[:, None, None]
    assert extend_audio(x, 9).flatten().tolist() == [0, 1, 2, 3, 4, 5, 5, 4, 3]
    w = audio_windows(x, 0, 3)
    assert w[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_avatar_buckets():
    assert avatar_bucket_size(720, 1280, "480P") == (480, 832)
    assert avatar_bucket_size(1280, 720, "720P") == (1280, 720)
    assert avatar_bucket_size(1080, 1920, "540P") == (544, 960)  # the original rejects 540P


# ---------------------------------------------------------------------------------------------- components vs golden
def test_euler_scheduler_matches_the_original():
    tensors = load_file(str(FIXTURES / "scheduler" / "tensors.safetensors"))
    key = "avatar_euler_s4_shift11"
    scheduler = SkyReelsV3FlowEulerScheduler(shift=11.0)
    scheduler.set_timesteps(4)
    torch.testing.assert_close(scheduler.timesteps, tensors[f"{key}.timesteps"][:-1], atol=0, rtol=0)
    sample = tensors[f"{key}.samples"][0]
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(tensors[f"{key}.model_outputs"][i], t, sample).prev_sample
        torch.testing.assert_close(sample, tensors[f"{key}.samples"][i + 1], atol=1e-6, rtol=0)


def test_wav2vec2_front_end_matches_the_original():
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    case = FIXTURES / "audio_wav2vec2"
    meta = json.loads((case / "case.json").read_text())
    tensors = load_file(str(case / "tensors.safetensors"))
    model = Wav2Vec2Model(Wav2Vec2Config(**meta["wav2vec2_config"])).eval()
    model.load_state_dict(load_file(str(case / "weights.safetensors")), strict=True)
    normalized = loudness_normalize(tensors["input.waveform"].numpy())
    np.testing.assert_allclose(normalized, tensors["loudness_norm.output"].numpy(), atol=1e-6)
    out = wav2vec2_features(model, Wav2Vec2FeatureExtractor(**meta["feature_extractor"]), normalized, meta["seq_len"])
    torch.testing.assert_close(out, tensors["output.audio_emb"], atol=1e-5, rtol=1e-5)


def test_lab_conversion_against_scikit_image():
    from skimage.color import lab2rgb, rgb2lab

    rgb = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = rgb_to_lab(rgb).permute(1, 2, 0).double().numpy()
    reference = rgb2lab(rgb.permute(1, 2, 0).double().numpy())
    np.testing.assert_allclose(ours, reference, atol=2e-3)
    back = lab_to_rgb(torch.from_numpy(reference).permute(2, 0, 1).float())
    np.testing.assert_allclose(back.permute(1, 2, 0).numpy(), lab2rgb(reference), atol=1e-3)


def test_colour_matching_moves_lab_statistics_to_the_reference():
    from skimage.color import rgb2lab

    g = torch.Generator().manual_seed(1)
    frames = torch.rand(2, 3, 24, 24, generator=g) * 0.5 - 0.8  # dark, low contrast, in [-1, 1]
    reference = torch.rand(3, 24, 24, generator=g) * 0.8 - 0.4  # in gamut after matching (no clipping)
    matched = match_colors(frames, reference)
    ref_lab = rgb2lab(((reference + 1) / 2).permute(1, 2, 0).double().numpy())
    for frame in matched:
        lab = rgb2lab(((frame + 1) / 2).permute(1, 2, 0).double().numpy())
        np.testing.assert_allclose(lab.mean(axis=(0, 1)), ref_lab.mean(axis=(0, 1)), atol=1.5)
        np.testing.assert_allclose(lab.std(axis=(0, 1)), ref_lab.std(axis=(0, 1)), atol=1.5)
    torch.testing.assert_close(match_colors(frames, reference, strength=0.0), frames, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_synthesised_speech_of_3_5_s_gives_88_frames_and_its_audio():
    wave = speech_wave(3.5)
    _, out = avatar(audio=wave, audio_sample_rate=16000)
    assert out.frames.shape == (1, 88, 32, 48, 3)
    np.testing.assert_array_equal(out.audio, wave)  # the original waveform by default
    _, normalized = avatar(audio=wave, audio_sample_rate=16000, output_audio="normalized")
    assert normalized.audio_sample_rate == 16000 and not np.allclose(normalized.audio, wave)


@pytest.mark.slow
def test_deterministic_and_options_change_the_windows():
    embeds = features(146)
    _, a = avatar(audio_embeds=embeds)
    _, b = avatar(audio_embeds=embeds)
    np.testing.assert_array_equal(a.frames, b.frames)
    _, c = avatar(audio_embeds=embeds, window_prompt=None)
    _, d = avatar(audio_embeds=embeds, clip_from_reference=True)
    first = 69  # the first window uses the portrait's CLIP tokens either way
    for other in (c, d):
        assert np.abs(a.frames[:, first:] - other.frames[:, first:]).max() > 0


def test_windows_checks_and_encodes_but_generates_only_when_iterated():
    pipe = tiny_pipeline("talking_avatar")
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: pytest.fail("generated before the run was iterated")
    run = pipe.windows(image=random_image(60, 40), audio_embeds=features(146), prompt="a woman talks", **SMALL)
    assert isinstance(run, AvatarRun) and (run.num_frames, run.num_clips, run.height, run.width) == (146, 4, 32, 48)
    assert run.audio is None and run.fps == 25
    with pytest.raises(ValueError, match="resolution"):
        pipe.windows(image=random_image(), audio_embeds=features(10), prompt="x", resolution="1080P")
    pipe.transformer.forward = forward
    short = pipe.windows(
        image=random_image(60, 40), audio_embeds=features(20), prompt="x", num_inference_steps=1, **SMALL
    )
    assert torch.is_grad_enabled()  # iterated outside any no_grad block, as the command line does
    (window,) = list(short)
    # before: the windows' VAE and transformer calls recorded autograd graphs (1 GB more per window at 96 x 160,
    # chained from window to window through the motion frames)
    assert window.latents.grad_fn is None and not window.latents.requires_grad and window.frames.shape[0] == 20


@pytest.mark.slow
def test_windows_yield_the_video_of_a_call_window_by_window():
    """The same run through `windows()`: every finished clip in order, the keyframe clip without frames, each
    window's new frames where they belong, together the video `pipe(...)` returns; and the state to go on from."""
    pipe, out = avatar(audio_embeds=features(209), output_type="pt")
    ends = []
    run = pipe.windows(
        image=random_image(60, 40),
        prompt="a woman talks",
        generator=torch.Generator().manual_seed(0),
        audio_embeds=features(209),
        callback_on_window_end=lambda p, index, total: ends.append((index, total)),
        **SMALL,
    )
    windows = list(run)
    assert [(w.index, w.window, len(w.frames), w.first_frame) for w in windows] == [
        (0, None, 0, 0),
        (1, 0, 69, 0),
        (2, 1, 64, 69),
        (3, 2, 76, 133),
    ]
    assert ends == [(0, 4), (1, 4), (2, 4), (3, 4)]  # after each window was handed on
    video = np.concatenate([w.frames for w in windows])
    np.testing.assert_array_equal(video, (out.frames[0].permute(0, 2, 3, 1) * 255).round().byte().numpy())
    assert all(w.frames.dtype == np.uint8 and w.latents.shape == (1, 16, 21, 4, 6) for w in windows)
    assert windows[0].state.keyframes.shape == (3, 3, 32, 48) and windows[0].state.motion is None
    assert windows[1].state.next_window == 1 and windows[1].state.motion.shape == (5, 3, 32, 48)


@pytest.mark.slow
def test_resume_gives_the_same_video(tmp_path):
    embeds = features(209)  # three windows
    _, full = avatar(audio_embeds=embeds)

    class Killed(Exception):
        pass

    def kill_after_first_window(pipe, window, total):
        if window == 2:
            raise Killed

    with pytest.raises(Killed):
        avatar(audio_embeds=embeds, resume_dir=tmp_path, callback_on_window_end=kill_after_first_window)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["next_window"] == 2 and (tmp_path / "window_00001.npy").is_file()

    windows_run = []
    _, resumed = avatar(
        audio_embeds=embeds,
        resume_dir=tmp_path,
        callback_on_window_end=lambda pipe, window, total: windows_run.append(window),
    )
    assert windows_run == [3]  # only the last window was generated again
    np.testing.assert_array_equal(resumed.frames, full.frames)

    with pytest.raises(ValueError, match="resume_dir"):
        avatar(audio_embeds=embeds, resume_dir=tmp_path, generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"audio": speech_wave(0.3), "audio_sample_rate": 16000}, "at least 0.4 s"),
        ({"audio": speech_wave(3.0), "audio_sample_rate": 16000, "max_audio_seconds": 2}, "over the limit"),
        ({"audio": np.zeros(16000, np.float32), "audio_sample_rate": 16000}, "silent"),
        ({"audio": speech_wave(1.0)}, "sample_rate"),
        ({"audio": "/nonexistent.wav"}, "file not found"),
        ({"audio": speech_wave(1.0), "audio_sample_rate": 16000, "image": "/nonexistent.png"}, "image"),
        ({"audio": None}, "audio"),
        (
            {
                "audio": speech_wave(1.0),
                "audio_sample_rate": 16000,
                "resolution": "1080P",
                "height": None,
                "width": None,
            },
            "resolution",
        ),
        (
            {"audio": speech_wave(1.0), "audio_sample_rate": 16000, "output_type": "latent", "resume_dir": "/tmp/r"},
            "output_type.*latent.*resume_dir",
        ),
    ],
)
def test_bad_inputs(kwargs, message):
    pipe = tiny_pipeline("talking_avatar")
    pipe.transformer.forward = lambda *a, **k: pytest.fail("model ran before validation")
    args = dict(image=random_image(), prompt="x", **SMALL)
    with pytest.raises(ValueError, match=message):
        pipe(**{**args, **kwargs})


def test_undecodable_audio_file(tmp_path):
    bad = tmp_path / "speech.mp3"
    bad.write_bytes(b"ID3" + b"\x00" * 64)
    with pytest.raises(ValueError, match="audio.*not a readable audio file|has no"):
        load_speech(bad)


@pytest.mark.parametrize("suffix", ["wav", "flac", "mp3", "m4a"])
def test_audio_formats_decode_to_16k_mono(tmp_path, suffix):
    import av

    path = tmp_path / f"speech.{suffix}"
    wave = speech_wave(1.0, rate=44100)
    codec = {"wav": "pcm_s16le", "flac": "flac", "mp3": "libmp3lame", "m4a": "aac"}[suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=44100, layout="stereo")
        fmt = stream.codec_context.format.name if stream.codec_context.format else "s16"
        planar = np.stack([wave, wave])
        if fmt.startswith("s16"):
            planar = (planar * 32767).astype(np.int16)
        elif fmt.startswith("s32"):
            planar = (planar * 2147483647).astype(np.int32)
        if not fmt.endswith("p"):
            planar = planar.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar), format=fmt, layout="stereo")
        frame.sample_rate = 44100
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    speech = load_speech(path)
    assert abs(speech.duration - 1.0) < 0.1 and speech.waveform.ndim == 1
    assert speech.source_rate == 44100 and speech.source.shape[1] == 2


@pytest.mark.slow
def test_latent_output_is_every_clips_final_latents():
    """`output_type="latent"`: the latents each clip ended with (keyframe clip, then the windows), in order."""
    finals = []

    def last_step(pipe, step, t, tensors):
        if step == pipe.num_timesteps - 1:
            finals.append(tensors["latents"].clone())
        return {}

    _, out = avatar(
        audio_embeds=features(100), num_inference_steps=2, output_type="latent", callback_on_step_end=last_step
    )
    assert out.frames.shape == (1, 3, 16, 21, 4, 6)  # keyframe clip + windows at 0 and 64
    torch.testing.assert_close(out.frames[0], torch.cat(finals), rtol=0, atol=0)


@pytest.mark.slow
def test_custom_sigmas_and_timesteps_reach_every_clip():
    """The default schedule passed explicitly gives the same video; another schedule another video."""
    kwargs = dict(audio_embeds=features(40), num_inference_steps=3, output_type="pt")
    _, default = avatar(**kwargs)
    base = np.linspace(1000, 1, 3, dtype=np.float32)
    _, by_sigmas = avatar(**kwargs, sigmas=(base / 1000).tolist())
    _, by_timesteps = avatar(**kwargs, timesteps=base.tolist())
    _, other = avatar(**kwargs, sigmas=[1.0, 0.5, 0.25])
    torch.testing.assert_close(by_sigmas.frames, default.frames, rtol=0, atol=1 / 255)
    torch.testing.assert_close(by_timesteps.frames, default.frames, rtol=0, atol=1 / 255)
    assert (other.frames - default.frames).abs().max() > 5 / 255


def test_reproduce_original_truncates_and_returns_the_normalized_track():
    wave = speech_wave(1.0)
    _, ours = avatar(audio=wave, audio_sample_rate=16000, num_inference_steps=1, output_type="pt")
    _, original = avatar(
        audio=wave, audio_sample_rate=16000, num_inference_steps=1, output_type="pt", reproduce_original=True
    )
    levels = lambda frames: (frames * 255).round()  # noqa: E731 (the uint8 levels behind the [0, 1] frames)
    difference = levels(ours.frames) - levels(original.frames)
    assert difference.min() >= 0 and difference.max() <= 1 and difference.mean() > 0.1  # truncation: half a level
    assert ours.audio_sample_rate == 16000 and np.array_equal(ours.audio, wave)
    assert original.audio_sample_rate == 16000 and not np.array_equal(original.audio, wave)
