"""whisper_io helpers on the tiny random Whisper (30 s window, real tiny.en tokenizer)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from workflow_scripts import whisper_io
from workflow_scripts.base_model import load_whisper, materialize
from workflow_scripts.sap_data import SAMPLE_RATE as SR

torch.set_num_threads(2)
LADDER = [5.0, 10.0, 20.0, 30.0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    path: Path = materialize("tiny-random", tmp_path_factory.mktemp("models") / "tiny-random")
    model, processor = load_whisper(path)
    whisper_io.use_encoder_windows(model, LADDER)
    return model, processor


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_input_features_pad_to_the_smallest_window_that_holds_the_batch(tiny):
    model, processor = tiny
    assert whisper_io.encoder_windows(model) == LADDER and whisper_io.window_seconds(model) == 30
    for seconds, frames in ((1.0, 500), (5.0, 500), (5.02, 1000), (9.5, 1000), (12.0, 2000), (30.0, 3000)):
        assert whisper_io.input_features(processor, [tone(1.0), tone(seconds)], LADDER).shape == (2, 80, frames)
    assert whisper_io.input_features(processor, [tone(1.0)]).shape == (1, 80, 3000)  # no ladder: the own window
    with pytest.raises(ValueError, match=r"clip of 30.50 s is longer than the largest encoder window \(30 s\)"):
        whisper_io.input_features(processor, [tone(1.0), tone(30.5)], LADDER)


def test_encoder_runs_every_window_and_keeps_its_own(tiny):
    model, processor = tiny
    encoder = model.get_encoder()
    clip = tone(2.0)
    with torch.no_grad():
        for window in LADDER:
            feats = whisper_io.input_features(processor, [clip], [window])
            out = encoder(feats).last_hidden_state
            assert out.shape[1] == window * 50
            # after each pass the model has its own window again (decoding sets the window per call)
            assert model.config.max_source_positions == encoder.embed_positions.num_embeddings == 1500
        # the first positions are shared: the first frames differ only through attention to padding
        five = encoder(whisper_io.input_features(processor, [clip], [5.0])).last_hidden_state
    assert not torch.allclose(five[0, :100], out[0, :100], atol=1e-4)  # the window matters: one per clip


def test_transcribe_puts_each_clip_in_its_own_window(tiny):
    model, processor = tiny
    # one clip per window (a batch's token budget follows its longest clip, so batch mates would share one)
    clips = [tone(12.0), tone(1.0), tone(6.0, 330.0)]
    together = whisper_io.transcribe(model, processor, clips, batch_size=4)
    alone = [whisper_io.transcribe(model, processor, [c], batch_size=1)[0] for c in clips]
    assert together == alone


def test_decoding_runs_the_encoder_at_each_clips_window(tiny):
    """transformers' generate() zero-pads its input to the model's own 30 s before the encoder; a model
    trained on short windows must decode at them."""
    model, processor = tiny
    frames: list[int] = []
    hook = model.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: frames.append((args[0] if args else kwargs["input_features"]).shape[-1]),
        with_kwargs=True)
    try:
        whisper_io.transcribe(model, processor, [tone(1.0), tone(6.0), tone(12.0), tone(25.0)], batch_size=4)
    finally:
        hook.remove()
    assert sorted(frames) == [500, 1000, 2000, 3000]
    assert model.config.max_source_positions == 1500  # the model's own window again afterwards


def test_decoding_logs_no_notice_per_batch(tiny):
    """transformers notes `max_new_tokens` overriding the config's max_length at every generate();
    a Dev eval would log it once per batch."""
    model, processor = tiny
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.generation.utils")
    logger.addHandler(handler)
    try:
        assert model.generation_config.max_length is not None  # as in every real Whisper config
        whisper_io.transcribe(model, processor, [tone(1.0)] * 4, batch_size=1)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "max_new_tokens" in m]


def test_encoder_frames_cover_real_audio():
    assert [whisper_io.encoder_frames(n) for n in (0, 1, 320, 321, SR, 30 * SR)] == [1, 1, 1, 2, 50, 1500]


def test_pooled_embeddings_ignore_padding(tiny):
    model, processor = tiny
    clip, other = tone(1.5), tone(3.0, freq=330.0)
    n = [len(clip), len(other)]
    with torch.no_grad():
        pooled = whisper_io.pooled_embeddings(model, whisper_io.input_features(processor, [clip, other]), n)
        # explicit trailing silence is the same as padding: real-audio frames and pooled vector stay put
        silent_tail = np.concatenate([clip, np.zeros(2 * SR, np.float32)])
        again = whisper_io.pooled_embeddings(model, whisper_io.input_features(processor, [silent_tail]),
                                             [len(clip)])
        whole_window = whisper_io.pooled_embeddings(model, whisper_io.input_features(processor, [clip]),
                                                    [10 * SR])
        both = whisper_io.pooled_embeddings(model, whisper_io.input_features(processor, [clip, other]), n,
                                            pooling="mean_std")
    assert pooled.shape == (2, model.config.d_model)
    torch.testing.assert_close(again[0], pooled[0])  # batch mates do not leak into each other either
    assert not torch.allclose(whole_window[0], pooled[0], atol=1e-3)  # padded silence would dominate
    assert both.shape == (2, 2 * model.config.d_model)
    torch.testing.assert_close(both[:, : model.config.d_model], pooled)
    assert (both[:, model.config.d_model:] > 0).all()
    with pytest.raises(ValueError, match="pooling"):
        whisper_io.pooled_embeddings(model, whisper_io.input_features(processor, [clip]), [len(clip)], "max")


def test_label_ids_english_only_format(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    labels = whisper_io.label_ids(processor, ["Turn on the lights.", "  Hi "])
    notimestamps, eos, sot = tok.convert_tokens_to_ids(["<|notimestamps|>", "<|endoftext|>",
                                                        "<|startoftranscript|>"])
    first = labels[0].tolist()
    assert first == [notimestamps, *tok.encode(" Turn on the lights.", add_special_tokens=False), eos]
    short = [t for t in labels[1].tolist() if t != -100]
    assert short == [notimestamps, *tok.encode(" Hi", add_special_tokens=False), eos]
    assert labels[1, len(short):].eq(-100).all() and labels.shape == (2, len(first))
    assert tok.decode(short, skip_special_tokens=True) == " Hi"
    # the model's shift-right supplies the single <|startoftranscript|>
    decoder_in = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
    assert decoder_in[:, 0].eq(sot).all() and decoder_in[:, 1].eq(notimestamps).all()
    assert sot not in first


def test_label_ids_multilingual_prefix(tiny):
    _, processor = tiny
    multilingual = copy.deepcopy(processor)
    multilingual.tokenizer.add_tokens(["<|extra|>"])  # 51865 tokens: the multilingual vocabulary size
    labels = whisper_io.label_ids(multilingual, ["hello"])
    prefix = multilingual.tokenizer.convert_tokens_to_ids(["<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    assert labels[0, :3].tolist() == prefix


def test_generate_kwargs_bound_tokens_by_duration():
    english = SimpleNamespace(config=WhisperConfig(vocab_size=51864, max_target_positions=448))
    kwargs = whisper_io.generate_kwargs(english, [SR, 2 * SR])
    assert kwargs["max_new_tokens"] == 6 * 2 + 10 and "language" not in kwargs and kwargs["num_beams"] == 1
    assert whisper_io.generate_kwargs(english, 3000 * SR)["max_new_tokens"] == 448 - 2
    multi = SimpleNamespace(config=WhisperConfig(vocab_size=51865, max_target_positions=448))
    kwargs = whisper_io.generate_kwargs(multi, 3000 * SR)
    assert (kwargs["language"], kwargs["task"], kwargs["max_new_tokens"]) == ("en", "transcribe", 448 - 4)


def test_transcribe_batched_equals_one_by_one(tiny):
    model, processor = tiny
    # equal lengths: a batch's token budget follows its longest clip
    audios = [tone(1.0), tone(1.0, 330.0)]
    batched = whisper_io.transcribe(model, processor, audios, batch_size=2)
    single = [whisper_io.transcribe(model, processor, [a], batch_size=1)[0] for a in audios]
    assert batched == single and len(batched) == 2
    budget = whisper_io.generate_kwargs(model, SR)["max_new_tokens"]
    assert all(len(processor.tokenizer.encode(t, add_special_tokens=False)) <= budget + 1 for t in batched)


def test_layer_picks_the_encoder_layer_it_names(tiny):
    model, processor = tiny
    encoder = model.get_encoder()
    num_layers = len(encoder.layers)
    clips = [tone(1.5), tone(3.0, freq=330.0)]
    n = [len(c) for c in clips]
    feats = whisper_io.input_features(processor, clips)
    # Reference taken with hooks, independently of transformers' hidden_states tuple: the input of
    # layer 0 and the raw output of every layer.
    seen: list[torch.Tensor] = []
    hooks = [encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
    hooks += [layer.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
              for layer in encoder.layers]
    with torch.no_grad():
        pooled = whisper_io.pooled_layers(model, feats, n, "mean", [0, 1, num_layers, "last"])
        for hook in hooks:
            hook.remove()
        frames = [whisper_io.encoder_frames(k) for k in n]

        def pool(hidden: torch.Tensor) -> torch.Tensor:
            return torch.stack([hidden[b, :f].mean(dim=0) for b, f in enumerate(frames)])

        after_norm = pool(encoder.layer_norm(seen[num_layers]))
        single = whisper_io.pooled_embeddings(model, feats, n, layer=1)
    layer0, layer1, layer_n, last = pooled
    torch.testing.assert_close(layer0, pool(seen[0]))  # 0: convs + positions, before any layer
    torch.testing.assert_close(layer1, pool(seen[1]))  # i: output of layer i
    torch.testing.assert_close(single, layer1)  # one pass for several layers = one pass per layer
    # num_layers is the final output after the encoder's layer norm, i.e. "last", not the raw output.
    torch.testing.assert_close(layer_n, after_norm)
    torch.testing.assert_close(last, after_norm)
    assert not torch.allclose(layer_n, pool(seen[num_layers]), atol=1e-3)
    assert not torch.allclose(layer0, last, atol=1e-3)


@pytest.mark.parametrize("layer", [3, -1, "2", "first", True])
def test_layer_out_of_range_names_the_setting(tiny, layer):
    model, processor = tiny
    clip = tone(1.0)
    with pytest.raises(ValueError, match=r"embeddings.layer=.* 2 layers"):
        whisper_io.pooled_embeddings(model, whisper_io.input_features(processor, [clip]), [len(clip)], layer=layer)
