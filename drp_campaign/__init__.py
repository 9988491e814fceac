"""drp-campaign: multi-site Rubin Data Release Processing campaigns.

The package is the Prefect-free core: ``model`` (pure domain logic), ``backends`` (interfaces and
their implementations), ``report`` and the ``drp-campaign`` command. Prefect lives only in the
top-level ``blocks``, ``tasks`` and ``flows`` packages.
"""

__version__ = "0.1.0"
