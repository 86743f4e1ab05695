"""Coordinator sidecar: routes among the replicas of one deployment."""
