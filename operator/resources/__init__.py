"""Child-manifest builders: pure functions from a spec to Kubernetes objects."""
