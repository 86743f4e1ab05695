"""What every data-plane role shares and none owns: wire header names and metric buckets.
Imports nothing of ModelFleet's, so gateway, sidecar, engine and runners can all depend on it."""
