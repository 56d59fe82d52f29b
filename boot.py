"""Runs first at every boot: kept tiny (no network)."""
