"""ModelFleet data plane: gateway, coordinator sidecar, engine core and runners."""
