"""Providers: where backends come from (DigitalOcean droplets, local processes)."""
