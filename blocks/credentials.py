"""Credential blocks for a data facility's Rucio and PanDA services.

Secrets are `pydantic.SecretStr`: ``repr``, ``str``, ``model_dump`` and ``model_dump_json`` show
``**********``, Prefect sends them to its API only when saving, and the API returns them obfuscated
unless asked with ``include_secrets``. Both blocks unwrap their secrets in exactly one place,
the method that hands plain settings to a backend client, and only when a task calls it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Self

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, model_validator

__all__ = ["PandaCredentials", "RucioCredentials"]


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


class RucioCredentials(Block):
    """How a data facility's tasks authenticate with Rucio.

    ``userpass`` needs ``username`` and ``password``; ``oidc`` needs ``token`` (an OIDC access
    token, as ``rucio`` reads from its token file).
    """

    # Validation errors would otherwise quote the raw input, secrets included.
    model_config = ConfigDict(hide_input_in_errors=True)
    _block_type_name: ClassVar[str] = "Rucio Credentials"
    _description: ClassVar[str] = (
        "Rucio server, account and credentials of one Rubin data facility (drp-campaign)."
    )

    rucio_host: str = Field(
        description="Rucio server URL, e.g. https://rubin-rucio.slac.stanford.edu:8443"
    )
    auth_host: str = Field(
        description="Rucio authentication server URL, e.g. https://rubin-rucio.slac.stanford.edu:8443"
    )
    account: str = Field(min_length=1, description="Rucio account the tasks act as.")
    vo: str = Field(default="def", min_length=1, description="Rucio VO ('def' if single-VO).")
    auth_type: Literal["userpass", "oidc"] = Field(
        default="userpass", description="Rucio authentication type."
    )
    username: str | None = Field(default=None, description="User name (userpass).")
    password: SecretStr | None = Field(default=None, description="Password (userpass).")
    token: SecretStr | None = Field(default=None, description="OIDC access token (oidc).")

    @model_validator(mode="after")
    def _credentials_for_auth_type(self) -> Self:
        if self.auth_type == "userpass" and (not self.username or not _reveal(self.password)):
            raise ValueError(
                "auth_type 'userpass' needs both 'username' and 'password'; set them, or use "
                "auth_type 'oidc' with a 'token'"
            )
        if self.auth_type == "oidc" and not _reveal(self.token):
            raise ValueError(
                "auth_type 'oidc' needs 'token' (an OIDC access token); set it, or use "
                "auth_type 'userpass' with 'username' and 'password'"
            )
        return self

    def client_settings(self) -> dict[str, Any]:
        """Plain settings for a Rucio client; the only place the secrets are unwrapped.

        Call it in the task that builds the client and pass the result straight to it: never
        log, return from a task, or store the dictionary.

        Returns
        -------
        settings : `dict` [`str`, `typing.Any`]
            ``host``, ``auth_host``, ``account``, ``vo``, ``auth_type``, ``username``,
            ``password`` and ``token`` (``None`` when not set).
        """
        return {
            "host": self.rucio_host,
            "auth_host": self.auth_host,
            "account": self.account,
            "vo": self.vo,
            "auth_type": self.auth_type,
            "username": self.username,
            "password": _reveal(self.password),
            "token": _reveal(self.token),
        }


class PandaCredentials(Block):
    """How a data facility's tasks submit to PanDA (the settings ctrl_bps_panda reads).

    They mirror panda-client's environment: ``PANDA_URL``, ``PANDA_URL_SSL``, ``PANDACACHE_URL``,
    ``PANDA_AUTH``, ``PANDA_AUTH_VO``, ``PANDA_VERIFY_HOST``, and the ID token panda-client keeps
    in ``$PANDA_CONFIG_ROOT/.token``.
    """

    # Validation errors would otherwise quote the raw input, secrets included.
    model_config = ConfigDict(hide_input_in_errors=True)
    _block_type_name: ClassVar[str] = "Panda Credentials"
    _description: ClassVar[str] = (
        "PanDA server URLs and OIDC ID token of one Rubin data facility (drp-campaign)."
    )

    panda_url: str = Field(
        description="PanDA server URL (PANDA_URL), e.g. http://pandaserver-doma.cern.ch:25080/server/panda"
    )
    panda_url_ssl: str = Field(
        description="PanDA server HTTPS URL (PANDA_URL_SSL), e.g. https://pandaserver-doma.cern.ch:25443/server/panda"
    )
    cache_url: str = Field(description="PanDA cache URL (PANDACACHE_URL).")
    auth: Literal["oidc"] = Field(default="oidc", description="PanDA authentication (PANDA_AUTH).")
    auth_vo: str = Field(
        default="Rubin", min_length=1, description="PanDA authentication VO (PANDA_AUTH_VO)."
    )
    id_token: SecretStr = Field(description="OIDC ID token for PanDA.")
    verify_host: bool = Field(
        default=True, description="Verify the server's host certificate (PANDA_VERIFY_HOST)."
    )
    run_temp_space: str | None = Field(
        default=None,
        description=(
            "Where a submission stages its prebuilt graph and Butler config "
            "(LSST_RUN_TEMP_SPACE), reachable from here and from the site's worker nodes, "
            "e.g. s3://bucket/panda-staging or a shared file system path."
        ),
    )
    idds_server: str | None = Field(
        default=None,
        description="The iDDS server, when not the PanDA relay's default (iddsServer).",
    )
    retries: int = Field(
        default=4, ge=1, description="Attempts of each PanDA call before the stage fails."
    )
    backoff_s: float = Field(
        default=5.0, gt=0, description="First wait between attempts, doubled each time (s)."
    )

    @model_validator(mode="after")
    def _token_present(self) -> Self:
        if not self.id_token.get_secret_value():
            raise ValueError("'id_token' is empty: set the OIDC ID token PanDA issued")
        return self

    def panda_settings(self, site: str) -> dict[str, Any]:
        """Plain settings for a PanDA client; the only place the ID token is unwrapped.

        Call it in the task that submits and pass the result straight to the client: never
        log, return from a task, or store the dictionary.

        Parameters
        ----------
        site : `str`
            The data facility the settings are for; it names the site in error messages.

        Returns
        -------
        settings : `dict` [`str`, `typing.Any`]
            ``panda_url``, ``panda_url_ssl``, ``cache_url``, ``auth``, ``auth_vo``,
            ``id_token`` and ``verify_host``; ``run_temp_space`` and ``idds_server`` when set.

        Raises
        ------
        ValueError
            If the block was built without validation (``validate=False``) and has no token.
        """
        token = self.id_token.get_secret_value()
        if not token:
            raise ValueError(f"the PanDA credentials of site {site!r} have an empty id_token")
        settings: dict[str, Any] = {
            "panda_url": self.panda_url,
            "panda_url_ssl": self.panda_url_ssl,
            "cache_url": self.cache_url,
            "auth": self.auth,
            "auth_vo": self.auth_vo,
            "id_token": token,
            "verify_host": self.verify_host,
        }
        for key in ("run_temp_space", "idds_server"):
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        return settings

    def retry_policy(self) -> dict[str, Any]:
        """``retries`` and ``backoff_s`` for `PandaWorkload` (not secret, not client settings)."""
        return {"retries": self.retries, "backoff_s": self.backoff_s}
