"""Audio items: a folder of sound files, decoded to mono float32 at the model's sample rate.

soundfile decodes (wav, flac, ogg, mp3); FFmpeg, through PyAV where it is installed (the
``m4a`` extra), decodes AAC and ALAC (.m4a, .aac); channels are averaged to mono; soxr
resamples (a real band-limited resampler, not linear interpolation); ``max_seconds`` crops
from the start. The graph does the model's own normalization, so the host hands it the
waveform as is.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from ducho_fast.config.model import InputOptions
from ducho_fast.data.items import FileStamp, error_reason, source_name
from ducho_fast.data.visual.images import Listing, list_files
from ducho_fast.errors import DataError, decode_error, stamped

SF_ERR_SYSTEM = 2  # libsndfile's code for a failed system call (sndfile.h)
# What libsndfile reads (Opus in Ogg from libsndfile 1.0.29; soundfile's wheels bundle 1.2).
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif"})
# AAC or ALAC in MP4 (.m4a) and raw AAC (.aac): libsndfile reads neither; Ducho's torchaudio
# decodes them with FFmpeg, and so does PyAV (FFmpeg's libraries in its wheel), where installed.
FFMPEG_SUFFIXES = frozenset({".m4a", ".aac"})
FFMPEG_INSTALL = "pip install 'ducho-fast[m4a]' (PyAV: FFmpeg's decoders in a wheel)"


def pyav_found() -> bool:
    """Whether PyAV is installed here (found, not imported: it takes a while)."""
    return importlib.util.find_spec("av") is not None


def audio_suffixes() -> frozenset[str]:
    """The suffixes of the audio files a folder's listing reads: :data:`AUDIO_SUFFIXES`, and
    .m4a and .aac where PyAV decodes them."""
    return AUDIO_SUFFIXES | FFMPEG_SUFFIXES if pyav_found() else AUDIO_SUFFIXES


def ffmpeg_hint(names: list[str]) -> str:
    """How to read .m4a and .aac files where nothing does, if ``names`` has one; else ''."""
    if pyav_found() or not any(os.path.splitext(n)[1].lower() in FFMPEG_SUFFIXES for n in names):
        return ""
    return f" .m4a and .aac files are read with FFmpeg's decoders: {FFMPEG_INSTALL}."


def list_audio(folder: Path) -> Listing:
    """Items for every audio file of ``folder`` in Ducho's order, and what is skipped."""
    return list_files(folder, audio_suffixes(), "audio")


def prepare_audio(
    source: str | os.PathLike[str] | np.ndarray,
    pre: Mapping[str, Any],
    options: InputOptions | None = None,
    source_rate: int | None = None,
) -> np.ndarray:
    """Mono float32 at ``pre['sample_rate']``, cropped to ``pre['max_seconds']`` if set.

    Args:
        source: a file, or a waveform array ((samples,) or (samples, channels)) at
            ``source_rate`` (the model's rate when not given).
    """
    rate = int(pre["sample_rate"])
    if source_rate is not None and not source_rate > 0:
        raise DataError(f"{source_name(source)}: a sample rate of {source_rate} Hz.")
    if isinstance(source, np.ndarray):
        wave, have = _from_array(source), source_rate or rate
    elif isinstance(source, str | os.PathLike) and os.fspath(source):
        wave, have = decode_audio(Path(source), pre.get("max_seconds"), options)
    else:
        raise DataError(
            "an audio input must be a file path or a waveform array, (samples,) or (samples, "
            f"channels) at the model's rate; found {source_name(source)}."
        )
    return finish_audio(wave, have, pre, source)


def decode_audio(
    path: Path, crop: float | None, options: InputOptions | None = None
) -> tuple[np.ndarray, int]:
    """The file's (samples, channels) float32 waveform and its rate; read up to ``crop``
    seconds when set. What models of a job with the same crop share."""
    return _read(path, (options or InputOptions()).max_audio_seconds, crop)


def finish_audio(wave: np.ndarray, have: int, pre: Mapping[str, Any], source: Any) -> np.ndarray:
    """A decoded waveform at rate ``have`` made mono, resampled and cropped for one model."""
    rate = int(pre["sample_rate"])
    crop = pre.get("max_seconds")
    source = source_name(source)
    if wave.shape[0] == 0:
        raise DataError(f"{source}: the audio is empty (0 samples).")
    mono = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    if not np.isfinite(mono).all():
        raise DataError(f"{source}: the audio holds NaN or infinite samples.")
    if have != rate:
        mono = soxr.resample(mono, have, rate, quality="HQ").astype(np.float32, copy=False)
    if crop:
        mono = mono[: round(float(crop) * rate)]
    if mono.shape[0] < int(pre.get("min_samples", 1)):
        raise DataError(
            f"{source}: {mono.shape[0]} samples at {rate} Hz is shorter than the model's "
            f"smallest input ({pre['min_samples']} samples)."
        )
    return np.ascontiguousarray(mono, dtype=np.float32)


def _read(path: Path, max_seconds: float, crop: float | None) -> tuple[np.ndarray, int]:
    if os.path.splitext(os.fspath(path))[1].lower() in FFMPEG_SUFFIXES:
        return _read_ffmpeg(path, max_seconds, crop)
    name = source_name(path)
    stamp = None
    try:
        stamp = FileStamp.of_input(name, path)  # a pipe would block the reader
        info = sf.info(str(path))
        seconds = info.frames / info.samplerate if info.samplerate else 0.0
        if crop is None:
            _check_length(name, seconds, max_seconds, stamp)
        frames = int(np.ceil(float(crop) * info.samplerate)) if crop else -1
        wave, rate = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except FileNotFoundError as e:  # from the stamp: libsndfile says only "System error"
        raise DataError(f"{name}: file not found.") from e
    except PermissionError as e:
        raise DataError(f"{name}: permission denied; make the file readable.") from e
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        message = f"{name}: not a readable audio file ({type(e).__name__}: {error_reason(e)})."
        if isinstance(e, sf.LibsndfileError) and e.code == SF_ERR_SYSTEM:
            stamp = None  # the system failed to read it, as an OSError with an errno
        raise decode_error(message, e, stamp) from e
    return wave, int(rate)


def _read_ffmpeg(path: Path, max_seconds: float, crop: float | None) -> tuple[np.ndarray, int]:
    """An .m4a or .aac file's (samples, channels) float32 waveform and rate, decoded by
    FFmpeg through PyAV: its first audio stream, as FFmpeg gives it (the encoder's priming
    samples dropped as the file says), each frame converted to float32 by FFmpeg's own
    converter; up to ``crop`` seconds when set."""
    name = source_name(path)
    if not pyav_found():
        raise DataError(
            f"{name}: .m4a and .aac files are read with FFmpeg's decoders: {FFMPEG_INSTALL}."
        )
    import av

    stamp = None
    try:
        stamp = FileStamp.of_input(name, path)  # a pipe would block the reader
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise stamped(f"{name}: the file holds no audio stream.", stamp)
            stream = container.streams.audio[0]
            rate, channels = int(stream.codec_context.sample_rate), stream.codec_context.channels
            if not rate > 0 or not channels > 0:
                raise stamped(
                    f"{name}: its audio stream says {rate} Hz, {channels} channels.", stamp
                )
            seconds = _stated_seconds(container)
            if crop is None and seconds is not None:  # before decoding what is refused
                _check_length(name, seconds, max_seconds, stamp)
            limit = math.ceil(float(crop) * rate) if crop else None
            wave = _decoded(container, stream, channels, limit)
    except FileNotFoundError as e:
        raise DataError(f"{name}: file not found.") from e
    except PermissionError as e:
        raise DataError(f"{name}: permission denied; make the file readable.") from e
    except (av.FFmpegError, ValueError, OSError) as e:
        message = f"{name}: not a readable audio file ({type(e).__name__}: {error_reason(e)})."
        raise decode_error(message, e, stamp) from e
    if crop is None and seconds is None:
        _check_length(name, wave.shape[0] / rate, max_seconds, stamp)
    return wave, rate


def _stated_seconds(container: Any) -> float | None:
    """How long the file says it is (the container's duration: its streams', or FFmpeg's
    estimate from the bit rate for raw AAC); None where it says nothing."""
    import av

    return container.duration / av.time_base if container.duration else None


def _decoded(container: Any, stream: Any, channels: int, limit: int | None) -> np.ndarray:
    """``stream``'s samples, interleaved float32 (FFmpeg's converter, at the stream's own
    rate and layout: no resampling, so it holds back no samples to flush), as (samples,
    channels); the first ``limit`` if set."""
    import av

    convert = av.AudioResampler(format="flt", layout=stream.layout.name, rate=stream.rate)
    parts, have = [], 0
    for frame in container.decode(stream):
        for out in convert.resample(frame):
            parts.append(out.to_ndarray().reshape(-1, channels))
            have += parts[-1].shape[0]
        if limit is not None and have >= limit:
            break
    wave = np.concatenate(parts) if parts else np.zeros((0, channels), np.float32)
    return np.ascontiguousarray(wave[:limit] if limit is not None else wave, dtype=np.float32)


def _check_length(name: str, seconds: float, max_seconds: float, stamp: FileStamp | None) -> None:
    if seconds > max_seconds:
        raise stamped(
            f"{name}: {seconds:.0f} s of audio, over input.max_audio_seconds "
            f"({max_seconds:g} s). Set the model's max_seconds to embed its start, or raise "
            "the limit.",
            stamp,
        )


def _from_array(given: np.ndarray) -> np.ndarray:
    array = given[:, np.newaxis] if given.ndim == 1 else given
    real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.ndim != 2 or not real:
        raise DataError(
            "waveforms must be integer or float arrays, (samples,) or (samples, channels); "
            f"found {source_name(given)}."
        )
    if 0 < array.shape[0] < array.shape[1]:
        raise DataError(
            f"a waveform of shape {array.shape} has more channels than samples: is it "
            "(channels, samples), as torchaudio loads audio? Pass its transpose (array.T)."
        )
    if np.issubdtype(array.dtype, np.integer):
        scale = float(np.iinfo(array.dtype).max) + 1.0
        return (array.astype(np.float32) / np.float32(scale)).astype(np.float32)
    return array.astype(np.float32, copy=False)
