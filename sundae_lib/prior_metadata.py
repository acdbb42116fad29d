"""What a prior file records besides its weights, as types: one reader and one writer.

A native prior file's header holds strings (``save_prior(..., metadata=...)``); besides the
reserved ``sundae.model_type`` / ``format_version`` / ``config`` they are:

==========================  ==================================================================
key                         value
==========================  ==================================================================
``sundae.codec``            the codec its tokens came from (:class:`~.codec_spec.CodecSpec`)
``sundae.vqgan_file``       the VQ-GAN's file name (part of the ``CodecSpec``: ``spec.file``)
``sundae.vqgan_source``     where that VQ-GAN can be fetched (``hf://...`` only: portable)
``sundae.label_map``        class names, a JSON list (``["0", "1", ...]``); id -> name or
                            name -> id dicts are read too
``sundae.sampling``         the recommended sampler settings, a JSON object
                            (:class:`SamplingDefaults`; the trainer adds its preview keys
                            ``num_samples`` and ``seed``, which readers ignore)
``sundae.train_step``       the optimizer step the weights come from
==========================  ==================================================================

:class:`PriorMetadata` reads them all (``PriorMetadata.of(prior)``) and writes them
(``to_metadata()``); :class:`SamplingDefaults` is the one definition of the sampler's defaults:
``sample()`` takes every setting not given from ``SamplingDefaults.from_prior(prior)``, the
trainer's ``[sampling]`` table is a ``SamplingDefaults`` (plus preview keys) and is what it
records, ``sundae-train sample`` / ``inpaint`` and the ComfyUI sampler use the same values.

This module imports no torch (the trainer's config reads it to keep ``--help`` fast).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .codec_spec import META_CODEC, META_VQGAN_FILE, CodecSpec

logger = logging.getLogger(__name__)

__all__ = [
    "META_LABEL_MAP",
    "META_SAMPLING",
    "META_TRAIN_STEP",
    "META_VQGAN_SOURCE",
    "PriorMetadata",
    "SamplingDefaults",
    "metadata_of",
    "parse_label_map",
]

META_LABEL_MAP = "sundae.label_map"
META_SAMPLING = "sundae.sampling"
META_VQGAN_SOURCE = "sundae.vqgan_source"
META_TRAIN_STEP = "sundae.train_step"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pair(value: Any, name: str) -> tuple[float, float]:
    """A schedule as ``(start, end)`` floats; one number means a constant."""
    if _number(value):
        return float(value), float(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_number(v) for v in value):
        return float(value[0]), float(value[1])
    raise ValueError(f"sampling.{name} = {value!r} must be a number or a [start, end] pair of numbers")


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampler settings a prior recommends, and the library's defaults when it records none.

    Fields (the keys of the ``sundae.sampling`` record and of the trainer's ``[sampling]``):
        steps: sampling steps (the schedules' length).
        temperature: ``(start, end)``, linear over the steps; lower = sharper.
        update_proportion: ``(start, end)`` fraction of positions that may change per step.
        early_stop: freeze a sample once a step changes none of its tokens.
        min_steps: steps that always run before early stopping may freeze a sample.
        cfg_scale: classifier-free guidance (1 = off; > 1 follows the class more strongly).

    The library defaults (a prior that records nothing) are ``SamplingDefaults()``: 100 steps,
    temperature 1.0 -> 0.7, every position updated, early stop after 10 steps, no guidance."""

    steps: int = 100
    temperature: tuple[float, float] = (1.0, 0.7)
    update_proportion: tuple[float, float] = (1.0, 1.0)
    early_stop: bool = True
    min_steps: int = 10
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("min_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"sampling.{name} = {value!r} must be an integer >= {low}")
        temperature = _pair(self.temperature, "temperature")
        if not all(t > 0 and math.isfinite(t) for t in temperature):
            raise ValueError(
                f"sampling.temperature = {list(temperature)} must be > 0 and finite (lower = sharper, "
                "1 = the model's distribution)"
            )
        update = _pair(self.update_proportion, "update_proportion")
        if not all(0 < p <= 1 for p in update):
            raise ValueError(
                f"sampling.update_proportion = {list(update)} must lie in (0, 1] (the fraction of "
                "positions that may change per step)"
            )
        if not isinstance(self.early_stop, bool):
            raise ValueError(f"sampling.early_stop = {self.early_stop!r} must be true or false")
        if not _number(self.cfg_scale) or not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ValueError(
                f"sampling.cfg_scale = {self.cfg_scale!r} must be a finite number >= 0 (1 = no guidance)"
            )
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "update_proportion", update)
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))

    # ---- the sampler's view ------------------------------------------------------------------

    @classmethod
    def from_prior(cls, prior: Any) -> SamplingDefaults:
        """The settings ``prior``'s file records (``sundae.sampling``), the missing ones from the
        library defaults; the library defaults when it records none. An unreadable record is
        logged as a warning and ignored (sampling with explicit settings still works; fix the
        file with ``sundae-train record-sampling``)."""
        raw = metadata_of(prior).get(META_SAMPLING)
        if not raw:
            return cls()
        try:
            return cls.from_json(raw)
        except ValueError as exc:
            logger.warning("the prior's %s record is unusable (%s); using the library defaults %s",
                           META_SAMPLING, exc, cls())
            return cls()

    def merged(self, **given: Any) -> SamplingDefaults:
        """These settings with the ``given`` ones that are not None put over them (validated):
        what ``sample()`` will use when called with ``given``."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def sample_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``sample()`` these settings give (the six fields above, not a
        subclass's extra keys)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingDefaults)}

    def describe(self) -> str:
        """For logs: ``25 steps, temperature 1.0->0.7, update 1.0->1.0, cfg 3.0, early stop after 10``."""
        t, p = self.temperature, self.update_proportion
        stop = f"early stop after {self.min_steps}" if self.early_stop else "no early stop"
        return (f"{self.steps} steps, temperature {t[0]:g}->{t[1]:g}, update {p[0]:g}->{p[1]:g}, "
                f"cfg {self.cfg_scale:g}, {stop}")

    # ---- the file's record ---------------------------------------------------------------------

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SamplingDefaults:
        """From a record (the ``sundae.sampling`` object): this class's fields are read, missing
        ones keep their defaults, other keys (another writer's) are ignored. Raises
        ``ValueError`` naming a bad value."""
        if not isinstance(record, Mapping):
            raise ValueError(f"{META_SAMPLING} must be a JSON object of settings, got {record!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in record.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> SamplingDefaults:
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, RecursionError, TypeError) as exc:
            raise ValueError(f"{META_SAMPLING} is not JSON ({exc}): {str(text)[:80]!r}") from None
        return cls.from_record(record)

    def to_record(self) -> dict[str, Any]:
        """The record as written to the file (JSON-friendly: schedules as ``[start, end]``)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_record())


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def parse_label_map(raw: str | None) -> tuple[str, ...] | None:
    """Class names from a ``sundae.label_map`` string: a JSON list of names (what the trainer
    writes), or a dict ``{"0": "cat"}`` (id -> name) or ``{"cat": 0}`` (name -> id) covering
    ids ``0..n-1``. Returns the names in id order, None for an empty record; raises
    ``ValueError`` for anything else."""
    if raw is None or not str(raw).strip():
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError, TypeError):
        raise ValueError(f"{META_LABEL_MAP} is not JSON: {str(raw)[:80]!r}") from None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return tuple(str(v) for v in value) or None
    if isinstance(value, dict) and value:
        by_id: dict[int, str] = {}
        for key, item in value.items():
            if isinstance(item, int) and not isinstance(item, bool):
                by_id[item] = str(key)  # name -> id
            elif str(key).lstrip("-").isdigit() and isinstance(item, (str, int, float)):
                by_id[int(key)] = str(item)  # id -> name
            else:
                by_id = {}
                break
        if sorted(by_id) == list(range(len(by_id))) and by_id:
            return tuple(by_id[i] for i in range(len(by_id)))
    raise ValueError(
        f"{META_LABEL_MAP} {str(raw)[:80]!r} is neither a list of class names nor a dict of names and "
        "ids 0..n-1"
    )


# --------------------------------------------------------------------------------------------
# the whole record
# --------------------------------------------------------------------------------------------


def metadata_of(prior: Any) -> Mapping[str, str]:
    """The string header a prior was loaded with (``prior.metadata``), looking through DDP and
    ``torch.compile`` wrappers (``_helpers.unwrap``); ``{}`` when there is none."""
    meta = getattr(prior, "metadata", None)
    if not isinstance(meta, Mapping):
        from ._helpers import unwrap  # torch: only here, where a torch module is at hand anyway

        meta = getattr(unwrap(prior), "metadata", None)
    return meta if isinstance(meta, Mapping) else {}


@dataclass(frozen=True)
class PriorMetadata:
    """A prior file's metadata, typed (every field None when the file does not record it).

    ``codec``: the codec spec (its ``file`` is ``sundae.vqgan_file``); ``vqgan_source``: an
    ``hf://`` source of that VQ-GAN; ``label_map``: class names in id order; ``sampling``: the
    recommended sampler settings; ``train_step``: the step the weights come from."""

    codec: CodecSpec | None = None
    vqgan_source: str | None = None
    label_map: tuple[str, ...] | None = None
    sampling: SamplingDefaults | None = None
    train_step: int | None = None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None, *, strict: bool = False) -> PriorMetadata:
        """Read a file's string header. A malformed entry raises ``ValueError`` with
        ``strict=True``; otherwise it is logged as a warning and left None (ids, explicit
        sampler settings and an explicit codec still work)."""
        meta = dict(metadata or {})
        fields: dict[str, Any] = {}
        readers = (
            ("codec", META_CODEC, lambda: CodecSpec.from_metadata(meta)),
            ("vqgan_source", META_VQGAN_SOURCE, lambda: meta.get(META_VQGAN_SOURCE) or None),
            ("label_map", META_LABEL_MAP, lambda: parse_label_map(meta.get(META_LABEL_MAP))),
            ("sampling", META_SAMPLING,
             lambda: SamplingDefaults.from_json(meta[META_SAMPLING]) if meta.get(META_SAMPLING) else None),
            ("train_step", META_TRAIN_STEP, lambda: _train_step(meta.get(META_TRAIN_STEP))),
        )
        for name, key, read in readers:
            try:
                fields[name] = read()
            except ValueError as exc:
                if strict:
                    raise
                logger.warning("ignoring the prior's unreadable %s: %s", key, exc)
        return cls(**fields)

    @classmethod
    def of(cls, prior: Any, *, strict: bool = False) -> PriorMetadata:
        """The metadata of a loaded prior (see :func:`metadata_of`)."""
        return cls.from_metadata(metadata_of(prior), strict=strict)

    def to_metadata(self) -> dict[str, str]:
        """The header strings for ``save_prior(..., metadata=...)``: only the fields that are set
        (``save_prior`` keeps the prior's other entries)."""
        out: dict[str, str] = {}
        if self.codec is not None:
            out[META_CODEC] = str(self.codec)
            if self.codec.file:
                out[META_VQGAN_FILE] = self.codec.file
        if self.vqgan_source:
            out[META_VQGAN_SOURCE] = self.vqgan_source
        if self.label_map:
            out[META_LABEL_MAP] = json.dumps(list(self.label_map))
        if self.sampling is not None:
            out[META_SAMPLING] = self.sampling.to_json()
        if self.train_step is not None:
            out[META_TRAIN_STEP] = str(self.train_step)
        return out


def _train_step(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not str(raw).isdigit():
        raise ValueError(f"{META_TRAIN_STEP} = {raw!r} is not a step number")
    return int(raw)
