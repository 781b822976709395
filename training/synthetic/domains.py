"""The seven domains and their families (line, flat, textured)."""

from __future__ import annotations

# ---------------------------------------------------------------------------
# Domains
# ---------------------------------------------------------------------------

DOMAINS: dict[str, str] = {
    "sketch": "line",
    "quickdraw": "line",
    "clipart": "flat",
    "infograph": "flat",
    "photo": "textured",
    "painting": "textured",
    "product": "textured",
}
FAMILIES: dict[str, list[str]] = {f: [d for d, g in DOMAINS.items() if g == f] for f in dict.fromkeys(DOMAINS.values())}
# Stable integer id per domain, used in the per-image seed.
_DOMAIN_INDEX: dict[str, int] = {d: i for i, d in enumerate(DOMAINS)}
