"""The admin listener: runtime API, metrics, status page (docs/admin-api.md)."""
