"""Detection as code: Prefect automations that start hotspare's flows, and prefect.yaml."""
