"""The benchmark workloads, one module each; ``WORKLOADS`` maps the CLI name to (title, run)."""
