"""The audit gate: rules (``rules``), the pure engine (``engine``), its bus loop (``loop``), CLI and bench."""
