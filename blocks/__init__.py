"""Prefect Blocks holding per-site settings and credentials (see DESIGN.md section 8)."""
