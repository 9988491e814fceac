"""Operator commands for a site's PanDA: ``drp-campaign panda ping`` and ``... panda status``.

``app`` is a `typer.Typer` meant to be mounted under the main command
(``app.add_typer(cli_panda.app, name="panda")`` in `drp_campaign.cli`).

Where the settings come from
----------------------------
Every command takes ``--site`` and finds that site's PanDA settings with `settings_for_site`.
Until the ``PandaCredentials`` Prefect block is wired in, it reads, in this order:

1. the JSON file given with ``--settings FILE``, or named by the environment variable
   ``DRP_CAMPAIGN_PANDA_SETTINGS``: ``{"sites": {"USDF": {...}, "FrDF": {...}}}`` (or the
   per-site mapping without ``"sites"``), each site with the keys of
   `~drp_campaign.backends.panda.PandaSettings.from_mapping` (the ``PandaCredentials`` block's
   fields ``panda_url``, ``panda_url_ssl``, ``cache_url``, ``auth_vo``, ``verify_host``, plus
   ``config_root``, ``run_temp_space``, ``idds_server``), and the token either inline as
   ``id_token`` or, better, as ``id_token_file``: a file holding the bare token or panda-client's
   token cache (``$PANDA_CONFIG_ROOT/.token``, JSON with an ``id_token`` key);
2. otherwise panda-client's own environment, as the PanDA setup scripts export it (one site's:
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
            f"no PanDA settings for site {site!r}: give --settings FILE, set {SETTINGS_ENV}, or "
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


def settings_for_site(
    site: str,
    settings_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> PandaSettings:
    """Find the PanDA settings of ``site`` (a stub until the ``PandaCredentials`` block).

    Parameters
    ----------
    site : `str`
        The site's name in the campaign spec.
    settings_file : `pathlib.Path`, optional
        A JSON settings file (see the module docstring); ``$DRP_CAMPAIGN_PANDA_SETTINGS`` when
        not given.
    environ : mapping, optional
        The environment to read (`os.environ` by default).

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
    if settings_file is None and env.get(SETTINGS_ENV):
        settings_file = Path(env[SETTINGS_ENV])
    if settings_file is not None:
        return _from_file(site, Path(settings_file).expanduser())
    return _from_environment(site, env)


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
        help=f"JSON file with the sites' PanDA settings (default: ${SETTINGS_ENV}, else the "
        "PANDA_* environment variables).",
    ),
]


@app.command()
def ping(site: SiteOption, settings: SettingsOption = None) -> None:
    """Check that the site's PanDA server answers and accepts its credentials."""
    try:
        panda_settings = settings_for_site(site, settings)
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


def _run_id_from_ledger(workdir: Path, step: str, site: str) -> str:
    from .ledger import Ledger

    path = workdir / "ledger.sqlite"
    if not path.is_file():
        raise SettingsError(f"no ledger at {path}: give --workdir of the campaign, or --run-id")
    run_id = Ledger(path).name(step, site, "run_id")
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
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="PanDA (iDDS) request id; overrides --step.")
    ] = None,
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Campaign work directory (holds ledger.sqlite).")
    ] = Path("."),
    settings: SettingsOption = None,
) -> None:
    """Show a run's state and per-label job counts, like ``bps report``."""
    try:
        if run_id is None:
            if step is None:
                raise SettingsError("give --run-id, or --step (with --workdir) to find it")
            run_id = _run_id_from_ledger(workdir, step, site)
        panda_settings = settings_for_site(site, settings)
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
