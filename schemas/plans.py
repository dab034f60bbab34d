"""Tiers as plans: limits and prices (document 000). A workspace names its tier in its lifecycle
events; prices live here, in code, so a bill is reproducible from the events plus this file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    tier: str
    base_vk_limit: int
    log_limit: int
    #: Price of gateway logs over the limit, in cents per 1,000 logs; the overage in cents is
    #: rounded up to a whole cent.
    overage_cents_per_1000_logs: int

    def overage_cents(self, log_count: int) -> int:
        over = max(0, log_count - self.log_limit)
        return -(-over * self.overage_cents_per_1000_logs // 1000)


PLANS: dict[str, Plan] = {
    p.tier: p
    for p in (
        Plan("free", base_vk_limit=3, log_limit=10_000, overage_cents_per_1000_logs=0),
        Plan("pro", base_vk_limit=25, log_limit=1_000_000, overage_cents_per_1000_logs=50),
        Plan("enterprise", base_vk_limit=250, log_limit=50_000_000, overage_cents_per_1000_logs=20),
    )
}


def plan_for(tier: str) -> Plan:
    """Unknown tiers fall back to ``free`` limits so a typo never grants more than it should."""
    return PLANS.get(tier, PLANS["free"])
