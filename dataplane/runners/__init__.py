"""Model runners: one module per runtime, all speaking the ModelRunner protocol."""
