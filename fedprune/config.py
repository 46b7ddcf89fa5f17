"""The typed job: one dataclass per config group, built from the plain nested mapping of the Hydra config.

The library never sees Hydra or OmegaConf: the CLI turns the composed config into a plain dict and calls
:meth:`JobConfig.from_mapping`. Parsing checks types and names the key of a bad value
(:class:`ConfigError`); the checks that need more than one group (the pruner against the pattern, the
assets on disk, the sites against the windows) are the ``check_*`` functions, which a protocol applies
before any work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def _get(mapping: Mapping, key: str, prefix: str, kind: Callable[[Any], T], default: Any = ...) -> T:
    """``kind(mapping[key])`` with an error naming ``prefix.key`` when missing or of the wrong type."""
    name = f"{prefix}.{key}" if prefix else key
    if key not in mapping or mapping[key] is None and default is not ...:
        if default is ...:
            raise ConfigError(f"config key '{name}': missing")
        return default
    value = mapping[key]
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{name}': must be true or false, got {value!r}")
    if kind in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{name}': must be a number, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key '{name}': {error}") from None


def _optional(kind: Callable[[Any], T]) -> Callable[[Any], T | None]:
    return lambda value: None if value is None else kind(value)


def _section(mapping: Mapping, key: str) -> Mapping:
    value = mapping.get(key)
    if value is None:
        return {}
    check(isinstance(value, Mapping), key, f"must be a group of keys, got {value!r}")
    return value


MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class ModelSpec:
    """``model``: a bundled model name or an HF folder, the dtype it is loaded in (block forwards run in
    it; statistics are float64 sums of at-least-float32 products, SparseGPT sweeps in float32), and
    ``offload``: keep the decoder blocks on disk and materialise one at a time (:mod:`fedprune.offload`)."""

    name: str
    path: str
    dtype: str = "float32"
    offload: bool = False

    @classmethod
    def from_mapping(cls, m: Mapping) -> ModelSpec:
        dtype = _get(m, "dtype", "model", str, "float32")
        check(
            dtype in MODEL_DTYPES, "model.dtype", f"must be one of {', '.join(MODEL_DTYPES)}; got {dtype!r}"
        )
        return cls(
            name=_get(m, "name", "model", str, "model"),
            path=_get(m, "path", "model", str, ""),
            dtype=dtype,
            offload=_get(m, "offload", "model", bool, False),
        )


@dataclass(frozen=True)
class DataSpec:
    """``data``: the corpus, its held-out works, window length and counts."""

    path: str
    heldout: tuple[str, ...]
    seq_len: int
    calib_windows: int
    eval_windows: int | None
    name: str = ""

    @classmethod
    def from_mapping(cls, m: Mapping) -> DataSpec:
        heldout = m.get("heldout") or ()
        check(not isinstance(heldout, str), "data.heldout", "must be a list of work names")
        return cls(
            path=_get(m, "path", "data", str, ""),
            heldout=tuple(str(w) for w in heldout),
            seq_len=_get(m, "seq_len", "data", int, 512),
            calib_windows=_get(m, "calib_windows", "data", int, 32),
            eval_windows=_get(m, "eval_windows", "data", _optional(int), None),
            name=_get(m, "name", "data", str, ""),
        )


@dataclass(frozen=True)
class PrunerSpec:
    """``pruner``: a registered pruner's name and its parameters."""

    name: str
    params: dict = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, m: Mapping) -> PrunerSpec:
        params = m.get("params") or {}
        check(isinstance(params, Mapping), "pruner.params", f"must be a group of keys, got {params!r}")
        return cls(name=_get(m, "name", "pruner", str, "wanda"), params=dict(params))


@dataclass(frozen=True)
class FederationSpec:
    """``federation``: how many sites, how many must reply, how windows are dealt, CPUs per site, and
    ``robust``: check each site's statistics against the median site's (``robust_scale``: how far off)."""

    num_clients: int = 4
    min_clients: int = 2
    partitioner: str = "by_document"
    cpus_per_client: float = 1.0
    round_timeout: float | None = None
    robust: bool = False
    robust_scale: float = 10.0

    @classmethod
    def from_mapping(cls, m: Mapping) -> FederationSpec:
        return cls(
            num_clients=_get(m, "num_clients", "federation", int, 4),
            min_clients=_get(m, "min_clients", "federation", int, 2),
            partitioner=_get(m, "partitioner", "federation", str, "by_document"),
            cpus_per_client=_get(m, "cpus_per_client", "federation", float, 1.0),
            round_timeout=_get(m, "round_timeout", "federation", _optional(float), None),
            robust=_get(m, "robust", "federation", bool, False),
            robust_scale=_get(m, "robust_scale", "federation", float, 10.0),
        )


@dataclass(frozen=True)
class PrivacySpec:
    """``privacy``: none, secure aggregation, or secure aggregation with distributed DP."""

    name: str = "none"
    threshold: int | None = None
    modulus_bits: int = 64
    value_words: float = 1.0
    token_bound: float = 1.0
    epsilon: float | None = None
    delta: float | None = None
    roster: str | None = None  # JSON file of the sites' identity public keys (None: unauthenticated)

    @classmethod
    def from_mapping(cls, m: Mapping) -> PrivacySpec:
        words = m.get("value_words", 1)
        check(
            isinstance(words, int | float) and not isinstance(words, bool),
            "privacy.value_words",
            f"must be a number, got {words!r}",
        )
        return cls(
            name=_get(m, "name", "privacy", str, "none"),
            threshold=_get(m, "threshold", "privacy", _optional(int), None),
            modulus_bits=_get(m, "modulus_bits", "privacy", int, 64),
            value_words=float(words),
            token_bound=_get(m, "token_bound", "privacy", float, 1.0),
            epsilon=_get(m, "epsilon", "privacy", _optional(float), None),
            delta=_get(m, "delta", "privacy", _optional(float), None),
            roster=_get(m, "roster", "privacy", _optional(str), None),
        )


@dataclass(frozen=True)
class StructuredSpec:
    """``structured`` (with ``pattern=structured``): what is removed in whole units. ``ffn``: fraction of
    FFN neurons removed in every block; ``heads``: fraction of query heads removed in every block, in whole
    key/value groups; ``blocks``: number of decoder blocks removed; ``attention``: number of attention
    sublayers removed."""

    ffn: float = 0.0
    heads: float = 0.0
    blocks: int = 0
    attention: int = 0

    @classmethod
    def from_mapping(cls, m: Mapping) -> StructuredSpec:
        spec = cls(
            ffn=_get(m, "ffn", "structured", float, 0.0),
            heads=_get(m, "heads", "structured", float, 0.0),
            blocks=_get(m, "blocks", "structured", int, 0),
            attention=_get(m, "attention", "structured", int, 0),
        )
        check(0.0 <= spec.ffn < 1.0, "structured.ffn", f"must be in [0, 1), got {spec.ffn}")
        check(0.0 <= spec.heads < 1.0, "structured.heads", f"must be in [0, 1), got {spec.heads}")
        check(spec.blocks >= 0, "structured.blocks", f"must be >= 0, got {spec.blocks}")
        check(spec.attention >= 0, "structured.attention", f"must be >= 0, got {spec.attention}")
        return spec

    @property
    def is_empty(self) -> bool:
        return not (self.ffn or self.heads or self.blocks or self.attention)


@dataclass(frozen=True)
class SpeedSpec:
    """``speed``: with ``measure``, the job times CPU prefill and greedy decode (:mod:`fedprune.speed`) of
    the dense model before pruning and of the pruned model after, on the first held-out window, and
    reports both in metrics.json. ``prefill_len`` (null: ``data.seq_len``) and ``prompt_len`` tokens,
    ``new_tokens`` generated, median of ``repeats`` timed runs after a warm-up."""

    measure: bool = False
    repeats: int = 3
    prefill_len: int | None = None
    prompt_len: int = 128
    new_tokens: int = 64

    @classmethod
    def from_mapping(cls, m: Mapping) -> SpeedSpec:
        spec = cls(
            measure=_get(m, "measure", "speed", bool, False),
            repeats=_get(m, "repeats", "speed", int, 3),
            prefill_len=_get(m, "prefill_len", "speed", _optional(int), None),
            prompt_len=_get(m, "prompt_len", "speed", int, 128),
            new_tokens=_get(m, "new_tokens", "speed", int, 64),
        )
        check(spec.repeats >= 1, "speed.repeats", f"must be >= 1, got {spec.repeats}")
        check(
            spec.prefill_len is None or spec.prefill_len >= 1,
            "speed.prefill_len",
            f"must be >= 1 or null, got {spec.prefill_len}",
        )
        check(spec.prompt_len >= 1, "speed.prompt_len", f"must be >= 1, got {spec.prompt_len}")
        check(spec.new_tokens >= 1, "speed.new_tokens", f"must be >= 1, got {spec.new_tokens}")
        return spec

    def settings(self, seq_len: int) -> dict:
        """How the figures are taken, as metrics.json reports them."""
        return {
            "repeats": self.repeats,
            "prefill_len": self.prefill_len or seq_len,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
        }


@dataclass(frozen=True)
class AllocationSpec:
    """``allocation`` (how each layer's sparsity is decided: ``uniform`` or ``owl``) and ``owl``'s
    parameters (``owl.m``: outlier threshold, times a block's mean score; ``owl.lambda``: spread)."""

    name: str = "uniform"
    m: float = 5.0
    lam: float = 0.08

    @classmethod
    def from_mapping(cls, name: object, owl: Mapping) -> AllocationSpec:
        from fedprune.allocation_rules import ALLOCATIONS

        unknown = sorted(set(owl) - {"m", "lambda"})
        check(not unknown, f"owl.{unknown[0] if unknown else ''}", "unknown key; known: m, lambda")
        spec = cls(
            name=_get({"allocation": name}, "allocation", "", str, "uniform"),
            m=_get(owl, "m", "owl", float, 5.0),
            lam=_get(owl, "lambda", "owl", float, 0.08),
        )
        check(spec.name in ALLOCATIONS, "allocation", f"unknown {spec.name!r}; known: {sorted(ALLOCATIONS)}")
        check(spec.m > 0, "owl.m", f"must be > 0, got {spec.m}")
        check(0 <= spec.lam < 0.5, "owl.lambda", f"must be in [0, 0.5), got {spec.lam}")
        return spec

    def rule(self):
        """The allocation rule (:mod:`fedprune.allocation_rules`); None for ``uniform`` (every layer
        gets ``sparsity``, nothing to compute)."""
        from fedprune.allocation_rules import get_allocation_rule
        from fedprune.owl import OwlSpec

        return None if self.name == "uniform" else get_allocation_rule(self.name, OwlSpec(self.m, self.lam))


@dataclass(frozen=True)
class JobConfig:
    """One run, typed. ``protocol`` keeps the protocol group's raw options: the protocol parses them."""

    model: ModelSpec
    data: DataSpec
    pruner: PrunerSpec
    federation: FederationSpec
    privacy: PrivacySpec
    protocol_name: str
    protocol: Mapping = field(default_factory=dict)
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 4
    eval_batch_size: int = 4
    save_model: bool = True
    progress: bool = True
    ignore: tuple[str, ...] = ()  # layer-name patterns left dense on purpose (fnmatch)
    threads: int | None = None  # torch intra-op threads of this process (None: torch's default)
    structured: StructuredSpec = field(default_factory=StructuredSpec)  # pattern=structured only
    allocation: AllocationSpec = field(default_factory=AllocationSpec)
    resume: bool = False  # continue the killed run in the same output folder from its last checkpoint
    speed: SpeedSpec = field(default_factory=SpeedSpec)  # CPU prefill / decode speed, dense and pruned

    @classmethod
    def from_mapping(cls, m: Mapping) -> JobConfig:
        """Parse the whole config (a plain nested mapping); ConfigError names the first bad key."""
        protocol = dict(_section(m, "protocol"))
        check("name" in protocol, "protocol.name", "missing")
        ignore = m.get("ignore") or ()
        check(
            not isinstance(ignore, str) and all(isinstance(p, str) and p for p in ignore),
            "ignore",
            f"must be a list of layer-name patterns, e.g. ['*.o_proj'], got {ignore!r}",
        )
        return cls(
            model=ModelSpec.from_mapping(_section(m, "model")),
            data=DataSpec.from_mapping(_section(m, "data")),
            pruner=PrunerSpec.from_mapping(_section(m, "pruner")),
            federation=FederationSpec.from_mapping(_section(m, "federation")),
            privacy=PrivacySpec.from_mapping(_section(m, "privacy")),
            protocol_name=str(protocol.pop("name")),
            protocol=protocol,
            sparsity=_get(m, "sparsity", "", _optional(float), None),
            pattern=_get(m, "pattern", "", str, "unstructured"),
            seed=_get(m, "seed", "", int, 0),
            device=_get(m, "device", "", str, "cpu"),
            batch_size=_get(m, "batch_size", "", int, 4),
            eval_batch_size=_get(m, "eval_batch_size", "", int, 4),
            save_model=_get(m, "save_model", "", bool, True),
            progress=_get(m, "progress", "", bool, True),
            ignore=tuple(ignore),
            threads=_positive_threads(_get(m, "threads", "", _optional(int), None)),
            structured=StructuredSpec.from_mapping(_section(m, "structured")),
            allocation=AllocationSpec.from_mapping(m.get("allocation"), _section(m, "owl")),
            resume=_get(m, "resume", "", bool, False),
            speed=SpeedSpec.from_mapping(_section(m, "speed")),
        )


def _positive_threads(threads: int | None) -> int | None:
    check(threads is None or threads >= 1, "threads", f"must be a positive number or null, got {threads}")
    return threads


def check_model_spec(spec: str, key: str = "model.path") -> None:
    """A bundled model name or an existing HF folder (with config.json)."""
    from fedprune.data.assets import MODEL_ASSETS

    if spec in MODEL_ASSETS:
        return
    path = Path(spec).expanduser()
    check(
        path.is_dir() and (path / "config.json").is_file(),
        key,
        f"{spec!r} is neither a bundled model ({', '.join(sorted(MODEL_ASSETS))}) "
        "nor an existing HF model folder with config.json",
    )


def check_corpus_spec(spec: str, key: str = "data.path") -> None:
    """A bundled corpus name or an existing folder of .txt works."""
    from fedprune.data.assets import CORPUS_ASSETS

    if spec in CORPUS_ASSETS:
        return
    path = Path(spec).expanduser()
    check(
        path.is_dir() and any(path.glob("*.txt")),
        key,
        f"{spec!r} is neither a bundled corpus ({', '.join(sorted(CORPUS_ASSETS))}) "
        "nor a folder of <work>.txt files",
    )


def build_pruner(spec: PrunerSpec):
    """The configured pruner; ConfigError naming ``pruner.name`` or ``pruner.params``."""
    from fedprune.pruners import get_pruner

    try:
        return get_pruner(spec.name, **spec.params)
    except KeyError as error:
        raise ConfigError(f"config key 'pruner.name': {error.args[0]}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key 'pruner.params': {error}") from None


def target_sparsity(job: JobConfig) -> float:
    """The sparsity to prune to: implied by an N:M pattern, else ``sparsity``."""
    from fedprune.masks import parse_pattern

    pattern = parse_pattern(job.pattern)
    if pattern.kind == "structured":
        return 0.0  # structured pruning removes whole units (``structured``), not single weights
    return pattern.sparsity if pattern.sparsity is not None else float(job.sparsity)


def check_llm_job(job: JobConfig) -> None:
    """Checks shared by the LLM protocols: pruner, pattern, sparsity, model, data, batch size."""
    from fedprune.masks import check_sparsity, parse_pattern
    from fedprune.pruners import check_pruner_supports

    pruner = build_pruner(job.pruner)
    try:
        pattern = parse_pattern(job.pattern)
    except ValueError as error:
        raise ConfigError(f"config key 'pattern': {error}") from None
    if pattern.kind == "structured":
        check_structured_job(job)
    elif pattern.sparsity is None:
        check(job.sparsity is not None, "sparsity", "missing: unstructured pruning needs a sparsity")
        try:
            check_sparsity(float(job.sparsity))
        except ValueError as error:
            raise ConfigError(f"config key 'sparsity': {error}") from None
    else:
        check(
            job.sparsity is None or abs(job.sparsity - pattern.sparsity) < 1e-12,
            "sparsity",
            f"{job.sparsity} conflicts with pattern {pattern} (which prunes {pattern.sparsity:g}); "
            f"give sparsity={pattern.sparsity:g} or sparsity=null with an N:M pattern",
        )
    try:
        check_pruner_supports(pruner, pattern)
    except ValueError as error:
        raise ConfigError(f"config key 'pattern': {error}") from None
    check(bool(job.model.path), "model.path", "missing: give a bundled model name or a folder")
    check_model_spec(job.model.path)
    check_corpus_spec(job.data.path)
    data = job.data
    check(data.seq_len >= 2, "data.seq_len", f"must be >= 2, got {data.seq_len}")
    check(data.calib_windows >= 1, "data.calib_windows", f"must be >= 1, got {data.calib_windows}")
    check(
        data.eval_windows is None or data.eval_windows >= 1,
        "data.eval_windows",
        f"must be >= 1 or null, got {data.eval_windows}",
    )
    check(job.batch_size >= 1, "batch_size", f"must be >= 1, got {job.batch_size}")
    check(job.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {job.eval_batch_size}")
    check_speed(job)
    check_kernel_settings()
    check(len(data.heldout) >= 1, "data.heldout", "name at least one held-out work")
    check_allocation(job, pruner, pattern)


def check_allocation(job: JobConfig, pruner, pattern) -> None:
    """A non-uniform allocation needs a data-driven pruner and unstructured pruning with one sparsity
    (a per-block N:M makes no sense; structured pruning removes whole units)."""
    name = job.allocation.name
    if job.allocation.rule() is None:  # uniform: nothing to check
        return
    check(
        pattern.kind == "unstructured",
        "allocation",
        f"{name!r} gives each block its own sparsity, which pattern {job.pattern!r} cannot express "
        "(use pattern=unstructured or allocation=uniform)",
    )
    check(
        pruner.stat_kind is not None,
        "allocation",
        f"{name!r} needs calibration statistics; pruner {pruner.name!r} is data-free",
    )
    check(not job.model.offload, "allocation", f"{name!r} does not work with model.offload=true yet")
    from fedprune.owl import MAX_SPARSITY

    check(
        target_sparsity(job) <= MAX_SPARSITY,
        "sparsity",
        f"allocation {name!r} needs a sparsity <= {MAX_SPARSITY}, got {target_sparsity(job)}",
    )


def check_kernel_settings() -> None:
    """A bad ``FEDPRUNE_LINEAR``, ``FEDPRUNE_ATTENTION`` or ``FEDPRUNE_GRAM`` (the block passes' float32
    linear and attention kernels, the bfloat16 Gram kernel) fails before any work."""
    from fedprune.cpu_attention import attention_backend
    from fedprune.cpu_gram import gram_backend
    from fedprune.cpu_linear import linear_backend

    for setting in (linear_backend, attention_backend, gram_backend):
        try:
            setting()
        except ValueError as error:
            raise ConfigError(f"environment variable {error}") from None


def check_speed(job: JobConfig) -> None:
    """``speed.measure``: windows that fit the held-out windows (``data.seq_len`` tokens), a model in memory."""
    speed = job.speed
    if not speed.measure:
        return
    seq_len = job.data.seq_len
    check(
        (speed.prefill_len or seq_len) <= seq_len,
        "speed.prefill_len",
        f"{speed.prefill_len} exceeds data.seq_len={seq_len} (the held-out windows' length)",
    )
    check(
        speed.prompt_len <= seq_len,
        "speed.prompt_len",
        f"{speed.prompt_len} exceeds data.seq_len={seq_len} (the held-out windows' length)",
    )
    check(not job.model.offload, "speed.measure", "does not work with model.offload=true (blocks on disk)")


def check_structured_job(job: JobConfig) -> None:
    """``pattern=structured``: something to remove, no ``ignore`` (every coupled layer is edited), and
    fractions that fit the model (:func:`fedprune.structured.targets.check_structure`)."""
    spec = job.structured
    check(
        not spec.is_empty,
        "structured",
        "pattern=structured removes nothing: set structured.ffn, structured.heads, structured.blocks or "
        "structured.attention",
    )
    check(
        not job.ignore,
        "ignore",
        "is not supported with pattern=structured (coupled layers are edited together)",
    )
    check(not job.model.offload, "model.offload", "is not supported with pattern=structured yet")
    influence = spec.blocks or (spec.attention and job.pruner.name != "gatenorm")
    check(
        not (influence and job.privacy.name == "secagg_dp"),
        "privacy.name",
        "secagg_dp has no noise calibrated for the influence sums that choose blocks / attention sublayers "
        "(use privacy=secagg, or pruner=gatenorm for attention only)",
    )
    if job.pruner.name == "gatenorm":
        check(
            spec.attention > 0 and not spec.ffn and not spec.heads,
            "structured",
            "pruner=gatenorm removes attention sublayers only: set structured.attention and no ffn / heads",
        )
    if job.model.path:
        from fedprune.data.assets import resolve_model_path
        from fedprune.structured.families import UnsupportedFamilyError
        from fedprune.structured.targets import StructureError, check_structure

        check_model_spec(job.model.path)
        try:
            path = str(resolve_model_path(job.model.path))
            check_structure(path, spec.ffn, spec.heads, spec.blocks, spec.attention)
        except UnsupportedFamilyError as error:
            raise ConfigError(f"config key 'pattern': {error}") from None
        except StructureError as error:
            raise ConfigError(f"config key '{error.key}': {error}") from None


def check_sites(fed: FederationSpec) -> None:
    """How many sites, how many must reply, CPUs each."""
    clients = fed.num_clients
    check(clients >= 1, "federation.num_clients", f"must be >= 1, got {clients}")
    check(
        1 <= fed.min_clients <= clients,
        "federation.min_clients",
        f"must be in [1, num_clients={clients}], got {fed.min_clients}",
    )
    check(fed.cpus_per_client > 0, "federation.cpus_per_client", "must be > 0")
    check(
        fed.round_timeout is None or fed.round_timeout > 0,
        "federation.round_timeout",
        f"must be > 0 or null, got {fed.round_timeout}",
    )
    check(fed.robust_scale > 1, "federation.robust_scale", f"must be > 1, got {fed.robust_scale}")


def check_llm_federation(job: JobConfig) -> None:
    """Sites of an LLM federation: :func:`check_sites`, the partitioner, enough windows, the device."""
    from fedprune.data.sites import SITE_PARTITIONERS

    check_sites(job.federation)
    fed = job.federation
    check(
        fed.partitioner in SITE_PARTITIONERS,
        "federation.partitioner",
        f"unknown partitioner {fed.partitioner!r}; known: {sorted(SITE_PARTITIONERS)}",
    )
    check(
        job.data.calib_windows >= fed.num_clients,
        "data.calib_windows",
        f"{job.data.calib_windows} windows cannot be split over {fed.num_clients} sites",
    )


def check_offload(job: JobConfig, supported: bool, protocols: tuple[str, ...]) -> None:
    """``model.offload`` against a protocol (``supported``: it loads blocks one at a time) and the device;
    an unsupported setting is an error, never a silent fallback to loading the whole model."""
    if not job.model.offload:
        return
    check(
        supported,
        "model.offload",
        f"block-by-block loading works with protocol {' or '.join(protocols)}, not {job.protocol_name!r} "
        "(use model.offload=false)",
    )
    check(
        job.device == "cpu",
        "model.offload",
        f"offloaded blocks are materialised on the CPU; got device={job.device!r}",
    )


def _check_roster(path: str, sites: int) -> None:
    """``privacy.roster``: a readable roster with at least one identity per site."""
    from fedprune.secure.identity import IdentityError, load_roster

    try:
        roster = load_roster(path)
    except IdentityError as error:
        raise ConfigError(f"config key 'privacy.roster': {error}") from error
    check(
        len(roster) >= sites,
        "privacy.roster",
        f"lists {len(roster)} identities for federation.num_clients={sites} sites",
    )


def check_privacy(
    job: JobConfig, secure: bool, dp: bool, secure_protocols: tuple[str, ...], dp_protocols: tuple[str, ...]
) -> None:
    """The ``privacy`` group against a protocol (``secure``: its server sums site payloads; ``dp``: the
    Gaussian mechanism on statistics applies). A setting where it cannot apply is an error."""
    from fedprune.secure.plan import PRIVACY_SETTINGS, VALUE_WORDS

    privacy = job.privacy
    check(
        privacy.name in PRIVACY_SETTINGS,
        "privacy.name",
        f"unknown privacy {privacy.name!r}; known: {list(PRIVACY_SETTINGS)}",
    )
    check(
        not job.federation.robust or privacy.name == "none",
        "federation.robust",
        f"its per-site checks need the sites' statistics in the clear, and privacy={privacy.name} shows "
        "the server only their sum (use privacy=none, or federation.robust=false)",
    )
    if privacy.name == "none":
        return
    check(
        secure,
        "privacy.name",
        f"{privacy.name} needs a protocol whose server sums site payloads ({', '.join(secure_protocols)}); "
        f"protocol {job.protocol_name!r} has none to protect this way",
    )
    sites = job.federation.num_clients
    if privacy.threshold is not None:
        check(
            2 <= privacy.threshold <= sites,
            "privacy.threshold",
            f"must be in [2, federation.num_clients={sites}], got {privacy.threshold}",
        )
    check(sites >= 2, "federation.num_clients", f"secure aggregation needs >= 2 sites, got {sites}")
    check(privacy.modulus_bits in range(8, 65), "privacy.modulus_bits", "must be in [8, 64]")
    check(privacy.token_bound > 0, "privacy.token_bound", f"must be > 0, got {privacy.token_bound}")
    check(
        privacy.value_words in VALUE_WORDS,
        "privacy.value_words",
        f"must be one of {VALUE_WORDS}, got {privacy.value_words!r}",
    )
    if privacy.roster is not None:
        _check_roster(privacy.roster, sites)
    if privacy.name != "secagg_dp":
        return
    check(
        dp,
        "privacy.name",
        f"secagg_dp adds noise to statistics: use protocol {' or '.join(dp_protocols)}, "
        f"not {job.protocol_name!r}",
    )
    check(
        privacy.epsilon is not None and privacy.epsilon > 0,
        "privacy.epsilon",
        f"must be > 0, got {privacy.epsilon}",
    )
    check(
        privacy.delta is not None and 0 < privacy.delta < 1,
        "privacy.delta",
        f"must be in (0, 1), got {privacy.delta}",
    )


def check_resume(job: JobConfig, supported: bool, protocols: tuple[str, ...]) -> None:
    """``resume=true`` against a protocol (``supported``: it writes per-block checkpoints) and the
    settings a checkpoint cannot continue: structured pruning and offloaded blocks (not checkpointed),
    and ``secagg_dp`` (a resumed run would release the interrupted block's noisy sums again, a privacy
    cost the accounting does not count: refused rather than spent silently)."""
    if not job.resume:
        return
    check(
        supported,
        "resume",
        f"resuming a killed run works with protocol {' or '.join(protocols)}, not {job.protocol_name!r} "
        "(rerun without resume=true)",
    )
    check(
        job.privacy.name != "secagg_dp",
        "resume",
        "is refused with privacy=secagg_dp: the interrupted block's noisy sums would be released again, "
        "uncounted by the DP accounting (rerun afresh without resume=true)",
    )
    check(job.pattern != "structured", "resume", "does not support pattern=structured yet")
    check(not job.model.offload, "resume", "does not support model.offload=true yet")
