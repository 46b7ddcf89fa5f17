"""How the server obtains the SUM of the sites' payloads: in the clear, or by secure aggregation.

``PRIVACY`` maps the ``privacy`` setting to a :class:`Sums` class, instantiated once per run (secure sums
keep the keys agreed for the run's later sums). ``none``: the server sees every site's statistics or
masks, and checks each site's statistics before they enter a sum (:mod:`fedprune.aggregation.site_checks`;
more with ``federation.robust``). ``secagg`` / ``secagg_dp``: every sum is a secure-aggregation instance
(``fedprune/protocols/secure_sums.py``); the server never sees one site's payload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fedprune.aggregation.block import aggregate_stats
from fedprune.aggregation.mask_vote import vote_counts
from fedprune.aggregation.site_checks import SiteChecks
from fedprune.payload import decode_masks, decode_stats
from fedprune.protocols.federation import Federation, Reply
from fedprune.protocols.messages import reply_tokens
from fedprune.protocols.secure_sums import PreparedSum, prepare_sums, secure_stats, secure_vote_counts
from fedprune.secure.identity import Roster
from fedprune.secure.plan import SecurePlan
from fedprune.stats import Stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsSum:
    """Summed statistics of one block by layer, and the sites whose data entered the sum."""

    stats: dict[str, Stats]
    sites: tuple[int, ...]
    tokens: int  # the sites' total calibration tokens


@dataclass(frozen=True)
class VoteSum:
    """Per layer, how many sites kept each weight; the sites counted and their total tokens."""

    counts: dict[str, torch.Tensor]
    sites: tuple[int, ...]
    tokens: int

    @property
    def num_sites(self) -> int:
        return len(self.sites)


class Sums:
    """The SUM of the sites' payloads, one per block or per run (one object per run); ``in_clear``: the
    server sees each site's payload (so ``checks`` can be robust)."""

    in_clear = False

    def __init__(
        self,
        fed: Federation,
        plan: SecurePlan | None,
        stat_kind: str | None,
        checks: SiteChecks | None = None,
        roster: Roster | None = None,
    ):
        self.fed, self.plan, self.stat_kind, self.roster = fed, plan, stat_kind, roster
        self.checks = SiteChecks() if checks is None else checks  # of sites' statistics in the clear
        self.last_tokens = 0  # total tokens of the sites in the last sum that counted them
        self.dp_rho_spent: dict[int, float] = {}  # DP: per site, the rho its releases reported
        if self.checks.robust and not self.in_clear:
            raise ValueError("federation.robust needs the sites' statistics in the clear (privacy=none)")

    def prepare(self, config: dict, count: int) -> None:
        """Called once before a run's ``count`` sums (``config``: the first sum's)."""
        raise NotImplementedError

    def _counted(self, summed: StatsSum | VoteSum) -> StatsSum | VoteSum:
        """Record ``summed``'s total tokens as :attr:`last_tokens`; return it."""
        self.last_tokens = summed.tokens
        return summed

    def progress(self) -> dict:
        """What a checkpoint keeps of these sums (JSON) so that a resumed run continues them."""
        return {"last_tokens": self.last_tokens}

    def restore_(self, progress: dict, used: int = 0) -> None:
        """Continue after a checkpoint's ``progress`` (``used``: the sites' next unused instance)."""
        self.last_tokens = int(progress.get("last_tokens", 0))

    def stats(
        self,
        config: dict,
        update: dict | None,
        widths: dict[str, int],
        tokens: dict[int, int],
        kind: str | None = None,
    ) -> StatsSum:
        """The summed statistics of one block (``widths``: input width per layer; ``kind``: the statistic,
        default the run's)."""
        raise NotImplementedError

    def votes(self, task: str, config: dict, update: dict | None, shapes: dict) -> VoteSum:
        """Per layer, how many sites kept each weight (task ``train.<task>`` gives the masks)."""
        raise NotImplementedError


class PlainSums(Sums):
    """``privacy=none``: sites send their payloads in the clear; the server checks each site's statistics
    (``checks``) and adds up those that pass."""

    in_clear = True

    def prepare(self, config: dict, count: int) -> None:
        """Nothing to agree on before plain sums."""

    def stats(
        self,
        config: dict,
        update: dict | None,
        widths: dict[str, int],
        tokens: dict[int, int],
        kind: str | None = None,
    ) -> StatsSum:
        def validate(node: int, reply: Reply) -> dict[str, Stats]:
            stats = decode_stats(reply.arrays, kind or self.stat_kind, widths, tokens[node])
            self.checks.check(stats)
            return stats

        got = self.fed.round("train.stats", config, update, validate, screen=self.checks.screen)
        ordered = [got[node] for node in self.fed.in_site_order(got)]  # float sums: a fixed order
        total = sum(tokens[n] for n in got)
        return self._counted(StatsSum(aggregate_stats(ordered), tuple(sorted(got)), total))

    def votes(self, task: str, config: dict, update: dict | None, shapes: dict) -> VoteSum:
        return self._counted(plain_votes(self.fed, task, config, update, shapes))


def plain_votes(fed: Federation, task: str, config: dict, update: dict | None, shapes: dict) -> VoteSum:
    """Per layer, how many sites kept each weight, from every site's masks in the clear."""
    tokens: dict[int, int] = {}

    def validate(node: int, reply: Reply) -> dict[str, torch.Tensor]:
        tokens[node] = reply_tokens(reply.metrics, config)
        return decode_masks(reply.arrays, shapes)

    got = fed.round(f"train.{task}", config, update, validate)
    masks = list(got.values())
    counts = {name: vote_counts([m[name] for m in masks]) for name in shapes}
    return VoteSum(counts, tuple(sorted(got)), sum(tokens[n] for n in got))


class SecureSums(Sums):
    """``privacy=secagg`` / ``secagg_dp``: every sum is a secure-aggregation instance whose keys were
    agreed beforehand (``prepare``: two rounds for all of a run's sums); with a ``roster`` (the sites'
    identity public keys), adverts are signed and every sum has a consistency round."""

    def __init__(self, *args, **kwargs) -> None:  # Sums' arguments; the plan is required here
        super().__init__(*args, **kwargs)
        if self.plan is None:
            raise ValueError("secure sums need a SecurePlan")
        self._ready: list[PreparedSum] = []
        self._instances = 0

    def prepare(self, config: dict, count: int) -> None:
        """Agree keys for the next ``count`` sums."""
        self._ready += prepare_sums(self.fed, config, self.plan, self._instances, count, self.roster)
        self._instances += count

    def progress(self) -> dict:
        """The next instance number: a resumed run keys fresh instances from there on."""
        return {**super().progress(), "next_instance": self._instances}

    def restore_(self, progress: dict, used: int = 0) -> None:
        """New instances start after every number the killed run or any site used (never reused)."""
        super().restore_(progress, used)
        self._ready = []
        self._instances = max(int(progress.get("next_instance", 0)), int(used), self._instances)

    def _take(self, config: dict) -> PreparedSum:
        if not self._ready:
            self.prepare(config, 1)
        return self._ready.pop(0)

    def stats(
        self,
        config: dict,
        update: dict | None,
        widths: dict[str, int],
        tokens: dict[int, int],
        kind: str | None = None,
    ) -> StatsSum:
        prepared = self._take(config)  # ``tokens``: 0 in the clear; the sum reveals the total
        stats, result = secure_stats(
            self.fed, prepared, config, update, self.plan, kind or self.stat_kind, widths
        )
        for node, value in result.dp_rho.items():
            self.dp_rho_spent[node] = self.dp_rho_spent.get(node, 0.0) + value
        return self._counted(StatsSum(stats, tuple(sorted(result.survivors)), result.tokens))

    def votes(self, task: str, config: dict, update: dict | None, shapes: dict) -> VoteSum:
        if (
            not shapes
        ):  # nothing voted (a block whose units all stay): no secret; the round moves the sites on (its
            # token counts are 0 in the clear: ``last_tokens`` stays the previous secure sum's)
            return plain_votes(self.fed, task, config, update, shapes)
        counts, sites, tokens = secure_vote_counts(
            self.fed, self._take(config), task, config, update, self.plan, shapes
        )
        return self._counted(VoteSum(counts, tuple(sorted(sites)), tokens))


PRIVACY: dict[str, type[Sums]] = {"none": PlainSums, "secagg": SecureSums, "secagg_dp": SecureSums}
