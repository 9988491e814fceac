"""Thin Prefect task wrappers over :mod:`drp_campaign`; the only place Blocks are loaded."""
