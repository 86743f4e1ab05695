"""ModelFleet operator: reconciles InferenceDeployment objects (kopf)."""
