"""The codec a prior was trained on, as its file records it, and the check that a codec fits.

A prior file's ``sundae.codec`` metadata names the codec its tokens came from:

- ``vqgan:sha256=<hex>,factor=<f>,channels=<c>`` (+ ``sundae.vqgan_file`` = the VQ-GAN's file
  name; older files have no ``channels``, some spell the file inside: ``file=<name>``)
- ``pixel:levels=<n>,channels=<c>`` (:class:`~.pixel_codec.PixelCodec`, factor 1)

:class:`CodecSpec` is the one parser and writer of that string (the trainer writes it; the
ComfyUI loader and sampler and the CLI read it). :func:`check_codec_pairing` says whether a
loaded codec can decode a prior's tokens: another factor, channel count or kind is an error
(the tokens would decode to garbage, or to an image of the wrong size); another sha256 is only
a warning (a fine-tuned VQ-GAN is a legitimate choice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CodecSpec", "check_codec_pairing"]

META_CODEC = "sundae.codec"
META_VQGAN_FILE = "sundae.vqgan_file"
_INT_KEYS = ("factor", "levels", "channels")
_TEXT_KEYS = ("sha256", "file")
_ALIASES = {"f": "factor"}  # early writers


@dataclass(frozen=True)
class CodecSpec:
    """A parsed ``sundae.codec`` string. ``kind``: ``vqgan`` or ``pixel`` (other kinds are kept
    as written); ``factor``: pixels per token (1 for pixels, None when not recorded);
    ``channels``: image channels (None when not recorded); ``levels``: grey levels of a pixel
    codec; ``sha256``: the VQ-GAN file's hash; ``file``: its file name; ``extra``: items of a
    newer writer, kept for ``str()``."""

    kind: str
    sha256: str | None = None
    factor: int | None = None
    levels: int | None = None
    channels: int | None = None
    file: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """``"vqgan:sha256=ab12..,factor=4"`` / ``"pixel:levels=16,channels=1"`` -> CodecSpec.
        A bare ``"pixel"`` means 256 grey levels, 1 channel. Raises ``ValueError`` on a
        malformed string."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"codec spec must be a non-empty string like 'vqgan:sha256=..,factor=4', got {text!r}")
        head, _, body = text.strip().partition(":")
        kind = head.strip().lower()
        if not kind or "=" in kind:
            raise ValueError(f"codec spec {text!r}: it must start with the codec kind ('vqgan:' or 'pixel:')")
        fields: dict[str, Any] = {}
        extra: list[tuple[str, str]] = []
        for item in filter(None, (part.strip() for part in body.split(","))):
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or not key:
                raise ValueError(f"codec spec {text!r}: bad item {item!r}; expected key=value")
            key = _ALIASES.get(key, key)
            if key in fields or any(key == k for k, _ in extra):
                raise ValueError(f"codec spec {text!r}: {key} given twice")
            if key in _INT_KEYS:
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"codec spec {text!r}: {key} must be an integer >= 1, got {value!r}")
                fields[key] = int(value)
            elif key in _TEXT_KEYS:
                fields[key] = value
            else:
                extra.append((key, value))
        if kind == "pixel":
            if fields.get("factor", 1) != 1:
                raise ValueError(f"codec spec {text!r}: a pixel codec has factor 1")
            fields["factor"] = 1
            fields.setdefault("levels", 256)
            fields.setdefault("channels", 1)
        return cls(kind=kind, extra=tuple(extra), **fields)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> CodecSpec | None:
        """The spec a prior file records (``sundae.codec`` + ``sundae.vqgan_file``), or None
        when it records none. Raises ``ValueError`` on a malformed one."""
        text = (metadata or {}).get(META_CODEC)
        if not text:
            return None
        spec = cls.parse(text)
        name = (metadata or {}).get(META_VQGAN_FILE)
        if name and spec.file is None:
            spec = dataclasses.replace(spec, file=name)
        return spec

    @classmethod
    def of_codec(cls, codec: Any, *, sha256: str | None = None, file: str | None = None) -> CodecSpec:
        """The spec of a loaded codec (a VQ-GAN or a :class:`~.pixel_codec.PixelCodec`)."""
        from .pixel_codec import PixelCodec

        if isinstance(codec, PixelCodec):
            return cls(kind="pixel", factor=1, levels=codec.levels, channels=codec.in_channels)
        return cls(kind="vqgan", sha256=sha256, factor=int(codec.downsample_factor),
                   channels=int(codec.in_channels), file=file)

    def __str__(self) -> str:
        """The ``sundae.codec`` string (``file`` only when it was written inside it; a prior
        file keeps the VQ-GAN's name in ``sundae.vqgan_file``)."""
        if self.kind == "pixel":
            items = [("levels", self.levels), ("channels", self.channels)]
        else:
            items = [("sha256", self.sha256), ("factor", self.factor), ("channels", self.channels),
                     ("levels", self.levels)]
        items += list(self.extra)
        body = ",".join(f"{k}={v}" for k, v in items if v is not None)
        return f"{self.kind}:{body}" if body else self.kind

    def describe(self) -> str:
        """For messages: ``a factor-4 VQ-GAN (3 channels) 'vq.safetensors'`` / ``pixels (16
        levels, grey)``."""
        channels = {None: None, 1: "grey", 3: "RGB"}.get(self.channels, f"{self.channels} channels")
        if self.kind == "pixel":
            return f"pixels ({self.levels} levels, {channels})"
        parts = [f"a factor-{self.factor}" if self.factor else "a", "VQ-GAN" if self.kind == "vqgan" else self.kind]
        if channels:
            parts.append(f"({channels})")
        if self.file:
            parts.append(repr(self.file))
        return " ".join(parts)


def check_codec_pairing(
    spec: CodecSpec | None,
    codec: Any,
    *,
    prior_name: str,
    codec_name: str,
    codec_sha256: str | None = None,
    who: str = "",
) -> list[str]:
    """Check that ``codec`` can decode the tokens of a prior trained on ``spec``.

    Raises ``ValueError`` naming both files when the codec's kind, factor, channel count or
    pixel levels differ from what the prior records. Returns warnings (to be logged by the
    caller) when only the VQ-GAN file differs (``codec_sha256`` vs the recorded sha256): a
    fine-tuned VQ-GAN is legitimate. ``spec`` None (an old prior recording nothing) passes."""
    if spec is None:
        return []
    have = CodecSpec.of_codec(codec, sha256=codec_sha256)
    prefix = f"{who}: " if who else ""
    wanted = spec.describe()
    fix = (f"load {spec.file!r}" if spec.kind == "vqgan" and spec.file else
           f"load '{wanted}'" if spec.kind == "pixel" else "load the codec the prior was trained on")
    problems = []
    if spec.kind in ("vqgan", "pixel") and have.kind != spec.kind:
        problems.append(f"it is {'a pixel codec' if have.kind == 'pixel' else 'a VQ-GAN'}")
    if spec.factor is not None and have.factor != spec.factor:
        problems.append(f"its factor is {have.factor}, the prior's is {spec.factor}")
    if spec.channels is not None and have.channels != spec.channels:
        problems.append(f"it has {have.channels} channels, the prior's codec {spec.channels}")
    if spec.kind == "pixel" and have.kind == "pixel" and have.levels != spec.levels:
        problems.append(f"it has {have.levels} levels, the prior's codec {spec.levels}")
    if problems:
        raise ValueError(
            f"{prefix}prior {prior_name!r} was trained on tokens of {wanted}, but the codec {codec_name!r} "
            f"does not fit: {'; '.join(problems)} — {fix}"
        )
    if spec.sha256 and codec_sha256 and codec_sha256 != spec.sha256:
        return [
            f"{prefix}the VQ-GAN {codec_name!r} is not the file prior {prior_name!r} was trained on "
            f"(sha256 {codec_sha256[:12]}... vs {spec.sha256[:12]}... recorded"
            f"{f', trained with {spec.file!r}' if spec.file else ''}); fine for a fine-tuned VQ-GAN, "
            f"otherwise {fix}"
        ]
    return []
