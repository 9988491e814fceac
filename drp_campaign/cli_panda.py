"""Operator commands for a site's PanDA: ``drp-campaign panda ping`` and ``... panda status``.

``app`` is a `typer.Typer` meant to be mounted under the main command
(``app.add_typer(cli_panda.app, name="panda")`` in `drp_campaign.cli`).

Where the settings come from
----------------------------
Every command takes ``--site`` and finds that site's PanDA settings with `settings_for_site`, in
this order:

1. the JSON file given with ``--settings FILE``;
2. the site's ``DataFacility`` Prefect block (``data-facility/<campaign>-<site>``, the one the
   campaign's flows use), when the campaign is named with ``--spec SPEC`` (or ``--campaign
   NAME``) and a Prefect API is configured (``PREFECT_API_URL``, or the active Prefect profile):
   its nested ``PandaCredentials`` give the URLs, VO and ID token; a block whose
   ``workload_backend`` is not ``panda`` is an error;
3. the JSON file named by the environment variable ``DRP_CAMPAIGN_PANDA_SETTINGS``:
   ``{"sites": {"USDF": {...}, "FrDF": {...}}}`` (or the per-site mapping without ``"sites"``),
   each site with the keys of `~drp_campaign.backends.panda.PandaSettings.from_mapping` (the
   ``PandaCredentials`` block's fields ``panda_url``, ``panda_url_ssl``, ``cache_url``,
   ``auth_vo``, ``verify_host``, plus ``config_root``, ``run_temp_space``, ``idds_server``), and
   the token either inline as ``id_token`` or, better, as ``id_token_file``: a file holding the
   bare token or panda-client's token cache (``$PANDA_CONFIG_ROOT/.token``, JSON with an
   ``id_token`` key);
4. otherwise panda-client's own environment, as the PanDA setup scripts export it (one site's:
   the same settings serve whatever ``--site`` names): ``PANDA_URL``, ``PANDA_URL_SSL``,
   ``PANDACACHE_URL`` (default ``PANDA_URL_SSL``), ``PANDA_AUTH_VO``, ``PANDA_VERIFY_HOST``,
   ``PANDA_CONFIG_ROOT``, ``LSST_RUN_TEMP_SPACE``, and the token from ``PANDA_AUTH_ID_TOKEN`` or
   ``$PANDA_CONFIG_ROOT/.token``.

Exit status: 0 on success, 1 when PanDA cannot be reached or refuses the call, 2 for a usage
error (no settings, no run id), 3 when PanDA refuses the credentials (the message says how to get
a new token).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .backends.interfaces import WorkloadAuthError, WorkloadError, WorkloadStatus
from .backends.panda import PandaSettings, PandaWorkload

__all__ = ["EXIT_AUTH", "EXIT_FAILED", "EXIT_USAGE", "SETTINGS_ENV", "app", "settings_for_site"]

#: Environment variable naming a settings JSON file (used when ``--settings`` is not given).
SETTINGS_ENV = "DRP_CAMPAIGN_PANDA_SETTINGS"

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3

app = typer.Typer(
    name="panda",
    help="Check a site's PanDA server and the runs submitted to it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


class SettingsError(ValueError):
    """The settings of a site cannot be found or are invalid; the message says what to fix."""


def _read_token_file(path: Path, site: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SettingsError(f"site {site!r}: cannot read id_token_file {path}: {exc}") from None
    if text.startswith("{"):
        # panda-client's token cache: {"id_token": ..., "refresh_token": ..., ...}
        try:
            token = json.loads(text).get("id_token", "")
        except ValueError:
            raise SettingsError(f"site {site!r}: {path} is neither a token nor JSON") from None
        return str(token)
    return text


def _from_file(site: str, path: Path) -> PandaSettings:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read the PanDA settings file {path}: {exc}") from None
    except ValueError as exc:
        raise SettingsError(f"{path} is not JSON: {exc}") from None
    sites = doc.get("sites", doc) if isinstance(doc, dict) else None
    if not isinstance(sites, dict) or site not in sites:
        known = sorted(sites) if isinstance(sites, dict) else []
        raise SettingsError(f"{path} has no PanDA settings for site {site!r} (it has {known})")
    values: dict[str, Any] = dict(sites[site])
    if "id_token_file" in values:
        token_file = Path(str(values.pop("id_token_file"))).expanduser()
        if not token_file.is_absolute():
            token_file = path.parent / token_file
        values["id_token"] = _read_token_file(token_file, site)
    elif "id_token" in values and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        err_console.print(
            f"[yellow]warning:[/] {path} holds an ID token and is readable by others: "
            "chmod 600 it, or use id_token_file",
            highlight=False,
        )
    if "config_root" in values:
        values["config_root"] = str(Path(str(values["config_root"])).expanduser())
    try:
        return PandaSettings.from_mapping(site, values)
    except ValueError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def _from_environment(site: str, environ: Mapping[str, str]) -> PandaSettings:
    missing = [k for k in ("PANDA_URL_SSL", "PANDA_AUTH_VO") if not environ.get(k)]
    if missing:
        raise SettingsError(
            f"no PanDA settings for site {site!r}: give --settings FILE, or --spec SPEC with "
            f"PREFECT_API_URL set (the site's DataFacility block), set {SETTINGS_ENV}, or "
            f"export panda-client's variables (missing: {', '.join(missing)})"
        )
    url_ssl = environ["PANDA_URL_SSL"]
    root = Path(environ.get("PANDA_CONFIG_ROOT") or "~/.panda").expanduser()
    token = environ.get("PANDA_AUTH_ID_TOKEN", "")
    if not token and (root / ".token").is_file():
        token = _read_token_file(root / ".token", site)
    values: dict[str, Any] = {
        "panda_url": environ.get("PANDA_URL") or url_ssl,
        "panda_url_ssl": url_ssl,
        "cache_url": environ.get("PANDACACHE_URL") or url_ssl,
        "auth_vo": environ["PANDA_AUTH_VO"],
        "id_token": token,
        "verify_host": environ.get("PANDA_VERIFY_HOST", "on"),
        "config_root": str(root),
    }
    if environ.get("LSST_RUN_TEMP_SPACE"):
        values["run_temp_space"] = environ["LSST_RUN_TEMP_SPACE"]
    try:
        return PandaSettings.from_mapping(site, values)
    except ValueError as exc:
        raise SettingsError(f"{exc} (from the PANDA_* environment variables)") from None


def _prefect_api_url(environ: Mapping[str, str] | None) -> str | None:
    """The Prefect API this process would load blocks from (`None` if there is none).

    With an explicit ``environ`` only its ``PREFECT_API_URL`` counts; otherwise Prefect's own
    settings decide (the environment variable or the active profile).
    """
    if environ is not None:
        return environ.get("PREFECT_API_URL") or None
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def _from_block(
    site: str, campaign: str, api_url: str, environ: Mapping[str, str] | None
) -> PandaSettings:
    from contextlib import nullcontext

    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        get_current_settings,
        temporary_settings,
    )

    from blocks import data_facility_document_name, load_data_facility

    where = f"data-facility/{data_facility_document_name(campaign, site)} at {api_url}"
    updates: dict[Any, Any] = {}
    if environ is not None and get_current_settings().api.url != api_url:
        # An explicit environment names another API than this process's settings.
        updates[PREFECT_API_URL] = api_url
        if environ.get("PREFECT_API_AUTH_STRING"):
            updates[PREFECT_API_AUTH_STRING] = environ["PREFECT_API_AUTH_STRING"]
    try:
        with temporary_settings(updates=updates) if updates else nullcontext():
            facility = load_data_facility(campaign, site)
    except Exception as exc:  # not found, invalid, or the API unreachable: all need the operator
        raise SettingsError(
            f"cannot load the DataFacility block {where}: {type(exc).__name__}: {exc}. Save "
            "the site's block (Prefect UI, or DataFacility(...).save), or give --settings FILE"
        ) from None
    if facility.workload_backend != "panda" or facility.panda is None:
        raise SettingsError(
            f"site {site!r} does not use PanDA: its block {where} has workload_backend "
            f"{facility.workload_backend!r}"
        )
    try:
        return PandaSettings.from_mapping(site, facility.panda.panda_settings(site))
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def settings_for_site(
    site: str,
    settings_file: Path | None = None,
    *,
    campaign: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> PandaSettings:
    """Find the PanDA settings of ``site`` (see the module docstring for the order).

    Parameters
    ----------
    site : `str`
        The site's name in the campaign spec.
    settings_file : `pathlib.Path`, optional
        A JSON settings file (see the module docstring); it wins over every other source.
    campaign : `str`, optional
        The campaign's name: with a Prefect API configured, the settings come from the site's
        ``DataFacility`` block of that campaign.
    environ : mapping, optional
        The environment to read (`os.environ` by default); when given, its ``PREFECT_API_URL``
        (not Prefect's settings) says whether there is a Prefect API.

    Returns
    -------
    settings : `PandaSettings`
        The site's settings.

    Raises
    ------
    SettingsError
        If no settings are found for the site or they are invalid (never quoting the token).
    """
    env = os.environ if environ is None else environ
    if settings_file is not None:
        return _from_file(site, Path(settings_file).expanduser())
    if campaign is not None:
        api_url = _prefect_api_url(environ)
        if api_url:
            return _from_block(site, campaign, api_url, environ)
    if env.get(SETTINGS_ENV):
        return _from_file(site, Path(env[SETTINGS_ENV]).expanduser())
    return _from_environment(site, env)


def _campaign_of(spec: Path | None, campaign: str | None) -> str | None:
    """The campaign named by ``--campaign`` or read from ``--spec``."""
    if spec is None:
        return campaign
    from .model.spec import load_spec

    try:
        name = load_spec(spec).campaign
    except Exception as exc:  # a usage error: the message says which file and why
        raise SettingsError(f"cannot read the campaign spec {spec}: {exc}") from None
    if campaign is not None and campaign != name:
        raise SettingsError(f"--campaign {campaign!r} is not the campaign of {spec} ({name!r})")
    return name


def _fail(exc: Exception) -> typer.Exit:
    if isinstance(exc, SettingsError):
        code, label = EXIT_USAGE, "error"
    elif isinstance(exc, WorkloadAuthError):
        code, label = EXIT_AUTH, "credentials refused"
    else:
        code, label = EXIT_FAILED, "error"
    err_console.print(f"[bold red]{label}:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


SiteOption = Annotated[str, typer.Option("--site", help="Site name, as in the campaign spec.")]
SettingsOption = Annotated[
    Path | None,
    typer.Option(
        "--settings",
        help="JSON file with the sites' PanDA settings (default: the site's DataFacility block "
        f"with --spec and a Prefect API, else ${SETTINGS_ENV}, else the PANDA_* environment "
        "variables).",
    ),
]
SpecOption = Annotated[
    Path | None,
    typer.Option(
        "--spec",
        help="Campaign spec: with PREFECT_API_URL set, the settings come from the site's "
        "DataFacility block of this campaign.",
    ),
]
CampaignOption = Annotated[
    str | None,
    typer.Option("--campaign", help="Campaign name (instead of --spec) for the block lookup."),
]


@app.command()
def ping(
    site: SiteOption,
    settings: SettingsOption = None,
    spec: SpecOption = None,
    campaign: CampaignOption = None,
) -> None:
    """Check that the site's PanDA server answers and accepts its credentials."""
    try:
        panda_settings = settings_for_site(site, settings, campaign=_campaign_of(spec, campaign))
        PandaWorkload(panda_settings, retries=2, backoff_s=2.0).ping()
    except (SettingsError, WorkloadError) as exc:
        raise _fail(exc) from None
    expiry = panda_settings.token_expiry
    until = f"; token valid until {expiry:%Y-%m-%d %H:%M} UTC" if expiry else ""
    console.print(
        f"{site}: PanDA at {panda_settings.panda_url_ssl} answers (VO "
        f"{panda_settings.auth_vo}){until}",
        highlight=False,
    )


def _run_id_from_ledger(workdir: Path, step: str, site: str, group: str | None) -> str:
    from .ledger import Ledger

    path = workdir / "ledger.sqlite"
    if not path.is_file():
        raise SettingsError(f"no ledger at {path}: give --workdir of the campaign, or --run-id")
    ledger = Ledger(path)
    groups = ledger.groups(step, site)
    if group is None and len(groups) > 1:
        raise SettingsError(
            f"step {step!r} at site {site!r} ran as groups {', '.join(groups)}: give --group"
        )
    group = group if group is not None else (groups[0] if groups else "")
    run_id = ledger.name(step, site, "run_id", group=group)
    if run_id is None:
        raise SettingsError(
            f"the ledger {path} has no run of step {step!r} at site {site!r} (not submitted yet?)"
        )
    return run_id


def _table(status: WorkloadStatus) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for column in ("LABEL", "TOTAL", "SUCCEEDED", "FAILED", "OTHER", "EXIT CODES"):
        table.add_column(column, justify="left" if column in ("LABEL", "EXIT CODES") else "right")
    totals = [0, 0, 0]
    for label in status.labels:
        other = label.total - label.succeeded - label.failed
        codes = ", ".join(str(c) for c in label.exit_codes)
        table.add_row(
            label.label,
            str(label.total),
            str(label.succeeded),
            str(label.failed),
            str(other),
            codes,
        )
        totals = [totals[0] + label.total, totals[1] + label.succeeded, totals[2] + label.failed]
    table.add_section()
    table.add_row(
        "Total",
        str(totals[0]),
        str(totals[1]),
        str(totals[2]),
        str(totals[0] - totals[1] - totals[2]),
        "",
    )
    return table


@app.command()
def status(
    site: SiteOption,
    step: Annotated[
        str | None, typer.Option("--step", help="Step name; its run id is read from the ledger.")
    ] = None,
    group: Annotated[
        str | None, typer.Option("--group", help="The step's group (g003), if it has several.")
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="PanDA (iDDS) request id; overrides --step.")
    ] = None,
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Campaign work directory (holds ledger.sqlite).")
    ] = Path("."),
    settings: SettingsOption = None,
    spec: SpecOption = None,
    campaign: CampaignOption = None,
) -> None:
    """Show a run's state and per-label job counts, like ``bps report``."""
    try:
        if run_id is None:
            if step is None:
                raise SettingsError("give --run-id, or --step (with --workdir) to find it")
            run_id = _run_id_from_ledger(workdir, step, site, group)
        panda_settings = settings_for_site(site, settings, campaign=_campaign_of(spec, campaign))
        result = PandaWorkload(panda_settings, retries=2, backoff_s=2.0).status(run_id)
    except (SettingsError, WorkloadError) as exc:
        raise _fail(exc) from None
    what = f"step {step} " if step else ""
    console.print(
        f"{what}run {result.run_id} at {site} ({panda_settings.panda_url_ssl}): "
        f"[bold]{result.state.value}[/]",
        highlight=False,
    )
    if result.labels:
        console.print(_table(result))
    else:
        console.print("no PanDA task yet (iDDS has not made the run's tasks)", highlight=False)
    if result.message:
        console.print(result.message, highlight=False)
