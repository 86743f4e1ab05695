"""HTTP header names that carry ModelFleet's routing facts between its roles."""

#: A request's prefix key (a hash of its leading tokens' text): the sidecar computes it for
#: prefix-affinity routing and the engine reports the recent ones in /load.
PREFIX_KEY_HEADER = "x-modelfleet-prefix-key"
