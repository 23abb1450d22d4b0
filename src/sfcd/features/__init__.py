"""Feature investigation: statistics, top activating contexts, logit effects, dashboards."""
