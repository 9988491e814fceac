"""``drp-campaign blocks``: register the block types, save the embedded-default blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import httpx
import typer

from drp_campaign.model.spec import SpecError, load_spec

from .credentials import RucioCredentials
from .manage import BlockConflict, NoPrefectAPI, register_block_types, save_embedded_blocks

app = typer.Typer(
    help="Prefect Blocks of the data facilities (needs PREFECT_API_URL: a running server).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Exit codes: a bad input the operator must fix, and a server or block state problem.
EXIT_USAGE = 2
EXIT_FAILED = 1


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _api_error(exc: httpx.HTTPError) -> typer.Exit:
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
        return _fail(
            "the Prefect server refused the request (401): it requires API authentication; "
            "set PREFECT_API_AUTH_STRING (source the server's env.sh)"
        )
    # Name the error class and the server only: no header, query or user info.
    try:
        url = exc.request.url
        where = f"the Prefect API at {url.scheme}://{url.host}:{url.port}"
    except RuntimeError:  # httpx raises it when the error carries no request
        where = "the Prefect API"
    return _fail(f"cannot reach {where}: {type(exc).__name__}")


@app.command()
def register() -> None:
    """Register the DataFacility, RucioCredentials and PandaCredentials block types."""
    try:
        slugs = register_block_types()
    except NoPrefectAPI as exc:
        raise _fail(str(exc)) from None
    except httpx.HTTPError as exc:
        raise _api_error(exc) from None
    for slug in slugs:
        typer.echo(f"registered block type {slug}")


@app.command()
def local(
    spec: Annotated[Path, typer.Option("--spec", help="Campaign spec YAML.")],
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Work directory of the embedded default.")
    ],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace blocks that hold other values.")
    ] = False,
    rucio_settings: Annotated[
        Path | None,
        typer.Option(
            "--rucio-settings",
            help="Use the Rucio of this settings file (rucio-local.json of "
            "scripts/rucio_local) as the data catalog instead of the embedded one.",
        ),
    ] = None,
    repo: Annotated[
        list[str] | None,
        typer.Option(
            "--repo",
            help="SITE=URI: the site's existing Butler repository (directory, butler.yaml or "
            "any URI daf_butler opens) instead of <workdir>/repos/<site>. Repeatable.",
        ),
    ] = None,
) -> None:
    """Save an embedded-default DataFacility block for every site of a campaign."""
    try:
        campaign = load_spec(spec)
    except SpecError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    repos: dict[str, str] = {}
    for item in repo or []:
        site, sep, uri = item.partition("=")
        if not sep or not site or not uri:
            raise _fail(f"--repo {item!r}: give SITE=URI, e.g. --repo FrDF=/data/frdf", EXIT_USAGE)
        repos[site] = uri
    rucio = None
    if rucio_settings is not None:
        import json

        try:
            client = json.loads(rucio_settings.read_text())["client"]
        except (OSError, KeyError, ValueError) as exc:
            raise _fail(
                f"{rucio_settings}: not a rucio-local.json with a 'client' object ({exc}); "
                "start the local Rucio with `make rucio-up`",
                EXIT_USAGE,
            ) from None
        rucio = RucioCredentials(
            rucio_host=client["host"],
            auth_host=client.get("auth_host") or client["host"],
            account=client["account"],
            vo=client.get("vo", "def"),
            auth_type=client.get("auth_type", "userpass"),
            username=client.get("username"),
            password=client.get("password"),
        )
    try:
        saved = save_embedded_blocks(
            campaign, workdir, overwrite=overwrite, rucio=rucio, repos=repos
        )
    except (NoPrefectAPI, BlockConflict) as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:  # a --repo for a site the spec lacks
        raise _fail(str(exc), EXIT_USAGE) from None
    except httpx.HTTPError as exc:
        raise _api_error(exc) from None
    for entry in saved:
        typer.echo(f"{entry.action:<11} data-facility/{entry.name}  (site {entry.site})")
