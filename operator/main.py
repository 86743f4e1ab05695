"""`modelfleet operator`: run the kopf operator (cluster-wide or one namespace)."""

from __future__ import annotations

import logging
import random

import kopf

from modelfleet.operator.settings import OperatorSettings


def run(*, verbose: bool = False) -> None:
    import modelfleet.operator.handlers  # noqa: F401  (registers the handlers)

    cfg = OperatorSettings()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s [operator] %(name)s: %(message)s",
    )
    # Distinct priorities make kopf peering a leader election: the highest acts, others pause.
    priority = cfg.priority if cfg.priority is not None else random.randint(1, 2**31 - 1)
    logging.getLogger(__name__).info("peering %r with priority %d", cfg.peering_name, priority)
    kopf.run(
        clusterwide=cfg.namespace is None,
        namespaces=[cfg.namespace] if cfg.namespace else (),
        standalone=False,
        peering_name=cfg.peering_name,
        priority=priority,
        liveness_endpoint=f"http://0.0.0.0:{cfg.health_port}/healthz" if cfg.health_port else None,
    )
