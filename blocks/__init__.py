"""Prefect Blocks holding per-site settings and credentials (see DESIGN.md section 8).

`DataFacility` (block type ``data-facility``) describes one site of one campaign and nests its
`RucioCredentials` (``rucio-credentials``) and `PandaCredentials` (``panda-credentials``), whose
secrets are `pydantic.SecretStr`. Documents are named ``<campaign>-<site>``
(`data_facility_document_name`); tasks load them with `load_data_facility`, and nothing here
talks to the Prefect API at import time.
"""

from .credentials import PandaCredentials, RucioCredentials
from .facility import (
    DataFacility,
    aload_data_facility,
    data_facility_document_name,
    data_facility_slug,
    embedded_data_facility,
    load_data_facility,
    load_data_facility_document,
)
from .manage import (
    BLOCK_TYPES,
    BlockConflict,
    NoPrefectAPI,
    SavedBlock,
    register_block_types,
    require_api_url,
    save_embedded_blocks,
)

__all__ = [
    "BLOCK_TYPES",
    "BlockConflict",
    "DataFacility",
    "NoPrefectAPI",
    "PandaCredentials",
    "RucioCredentials",
    "SavedBlock",
    "aload_data_facility",
    "data_facility_document_name",
    "data_facility_slug",
    "embedded_data_facility",
    "load_data_facility",
    "load_data_facility_document",
    "register_block_types",
    "require_api_url",
    "save_embedded_blocks",
]
