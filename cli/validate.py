"""Config checks that run before any model is loaded: a bad config fails with a message naming the key."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fedprune.data.assets import CORPUS_ASSETS, MODEL_ASSETS
from fedprune.masks import check_sparsity, parse_pattern
from fedprune.pruners import check_pruner_supports, get_pruner


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def check_model_spec(spec: str, key: str = "model.path") -> None:
    """A bundled model name or an existing HF folder (with config.json)."""
    if spec in MODEL_ASSETS:
        return
    path = Path(spec).expanduser()
    _check(
        path.is_dir() and (path / "config.json").is_file(),
        key,
        f"{spec!r} is neither a bundled model ({', '.join(sorted(MODEL_ASSETS))}) "
        "nor an existing HF model folder with config.json",
    )


def check_corpus_spec(spec: str, key: str = "data.path") -> None:
    """A bundled corpus name or an existing folder of .txt works."""
    if spec in CORPUS_ASSETS:
        return
    path = Path(spec).expanduser()
    _check(
        path.is_dir() and any(path.glob("*.txt")),
        key,
        f"{spec!r} is neither a bundled corpus ({', '.join(sorted(CORPUS_ASSETS))}) "
        "nor a folder of <work>.txt files",
    )


def validate_common(cfg: DictConfig) -> None:
    """Checks shared by every protocol: pruner, pattern, sparsity, model and data."""
    try:
        pruner = get_pruner(cfg.pruner.name, **cfg.pruner.get("params", {}))
    except KeyError as error:
        raise ConfigError(f"config key 'pruner.name': {error.args[0]}") from None
    except TypeError as error:
        raise ConfigError(f"config key 'pruner.params': {error}") from None
    try:
        pattern = parse_pattern(str(cfg.pattern))
    except ValueError as error:
        raise ConfigError(f"config key 'pattern': {error}") from None
    try:
        check_sparsity(float(cfg.sparsity))
    except ValueError as error:
        raise ConfigError(f"config key 'sparsity': {error}") from None
    try:
        check_pruner_supports(pruner, pattern)
    except ValueError as error:
        raise ConfigError(f"config key 'pattern': {error}") from None
    _check(bool(cfg.model.path), "model.path", "missing: give a bundled model name or a folder")
    check_model_spec(str(cfg.model.path))
    check_corpus_spec(str(cfg.data.path))
    data = cfg.data
    _check(int(data.seq_len) >= 2, "data.seq_len", f"must be >= 2, got {data.seq_len}")
    _check(
        int(data.calib_windows) >= 1,
        "data.calib_windows",
        f"must be >= 1, got {data.calib_windows}",
    )
    _check(
        data.eval_windows is None or int(data.eval_windows) >= 1,
        "data.eval_windows",
        f"must be >= 1 or null, got {data.eval_windows}",
    )
    _check(int(cfg.batch_size) >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    _check(len(data.heldout) >= 1, "data.heldout", "name at least one held-out work")


def validate_sites(cfg: DictConfig) -> None:
    """Checks of the sites every federated protocol needs: how many, how many must reply, CPUs each."""
    fed = cfg.federation
    clients = int(fed.num_clients)
    _check(clients >= 1, "federation.num_clients", f"must be >= 1, got {clients}")
    _check(
        1 <= int(fed.min_clients) <= clients,
        "federation.min_clients",
        f"must be in [1, num_clients={clients}], got {fed.min_clients}",
    )
    _check(float(fed.cpus_per_client) > 0, "federation.cpus_per_client", "must be > 0")


def validate_federation(cfg: DictConfig) -> None:
    """Checks of the ``federation`` group and the protocol options."""
    from fedprune.data.sites import SITE_PARTITIONERS
    from fedprune.masks import GROUPS

    validate_privacy(cfg)
    validate_sites(cfg)
    fed = cfg.federation
    clients = int(fed.num_clients)
    _check(
        str(fed.partitioner) in SITE_PARTITIONERS,
        "federation.partitioner",
        f"unknown partitioner {fed.partitioner!r}; known: {sorted(SITE_PARTITIONERS)}",
    )
    _check(
        int(cfg.data.calib_windows) >= clients,
        "data.calib_windows",
        f"{cfg.data.calib_windows} windows cannot be split over {clients} sites",
    )
    protocol = cfg.protocol
    if "group" in protocol:
        _check(
            str(protocol.group) in GROUPS, "protocol.group", f"must be one of {GROUPS}, got {protocol.group}"
        )
    if str(protocol.name) == "stats_sync":
        pruner = get_pruner(cfg.pruner.name, **cfg.pruner.get("params", {}))
        _check(
            pruner.stat_kind is not None,
            "pruner.name",
            f"stats_sync needs a pruner with calibration statistics; {pruner.name!r} is data-free "
            "(use protocol=mask_vote or centralized)",
        )


SECURE_PROTOCOLS = ("mask_vote", "mask_vote_sync", "stats_sync")  # where secure aggregation applies
DP_PROTOCOLS = ("stats_sync",)  # where the Gaussian mechanism on statistics applies


def validate_privacy(cfg: DictConfig) -> None:
    """Checks of the ``privacy`` group (any protocol: a secure setting where it cannot apply is an error)."""
    from fedprune.secure.plan import PRIVACY_SETTINGS, VALUE_WORDS

    privacy = cfg.get("privacy")
    if privacy is None:
        return
    name = str(privacy.get("name"))
    _check(
        name in PRIVACY_SETTINGS, "privacy.name", f"unknown privacy {name!r}; known: {list(PRIVACY_SETTINGS)}"
    )
    if name == "none":
        return
    protocol = str(cfg.protocol.name)
    _check(
        protocol in SECURE_PROTOCOLS,
        "privacy.name",
        f"{name} needs a protocol whose server sums site payloads ({', '.join(SECURE_PROTOCOLS)}); "
        f"protocol {protocol!r} has none to protect this way",
    )
    sites = int(cfg.federation.num_clients)
    threshold = privacy.get("threshold")
    if threshold is not None:
        _check(
            2 <= int(threshold) <= sites,
            "privacy.threshold",
            f"must be in [2, federation.num_clients={sites}], got {threshold}",
        )
    _check(sites >= 2, "federation.num_clients", f"secure aggregation needs >= 2 sites, got {sites}")
    _check(int(privacy.get("modulus_bits", 64)) in range(8, 65), "privacy.modulus_bits", "must be in [8, 64]")
    _check(float(privacy.token_bound) > 0, "privacy.token_bound", f"must be > 0, got {privacy.token_bound}")
    words = privacy.get("value_words", 1)
    _check(
        isinstance(words, int | float) and not isinstance(words, bool) and words in VALUE_WORDS,
        "privacy.value_words",
        f"must be one of {VALUE_WORDS}, got {words!r}",
    )
    if name != "secagg_dp":
        return
    _check(
        protocol in DP_PROTOCOLS,
        "privacy.name",
        f"secagg_dp adds noise to statistics: use protocol {' or '.join(DP_PROTOCOLS)}, not {protocol!r}",
    )
    _check(float(privacy.epsilon) > 0, "privacy.epsilon", f"must be > 0, got {privacy.epsilon}")
    _check(0 < float(privacy.delta) < 1, "privacy.delta", f"must be in (0, 1), got {privacy.delta}")
