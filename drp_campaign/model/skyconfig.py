"""The RingsSkyMap config a spec may set, and what each key defaults to per tract builder.

Kept apart from :mod:`drp_campaign.model.sky` so that the spec loader can check the keys without
importing numpy, astropy and sphgeom. Standard library only.

The defaults are the project's skymaps (``lsst_cells_v1``, ``DC2_cells_v1``, DC2 legacy: DESIGN.md
section 3), which are also the values the builders' own configs in ``lsst.skymap`` give to the patch
geometry. ``pixelScale`` and ``tractOverlap`` of a bare ``lsst.skymap`` config default to 0.333"
and 1 deg, which no Rubin skymap uses; the project's defaults (0.2", 1/60 deg) keep every existing
spec's geometry and hash unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "CELL_BORDER",
    "CELL_INNER",
    "SKYMAP_CONFIG_KEYS",
    "SkyMapConfig",
    "SkymapLike",
    "builder_defaults",
    "cell_layout",
    "resolve_config",
    "resolve_skymap",
]

Builder = Literal["cells", "legacy"]

# ``CellTractBuilderConfig`` defaults: cells of 150 px with a 50 px border. A spec sets patch sizes
# in pixels; with the cells builder they must be whole cells of this size (see `cell_layout`).
CELL_INNER = 150
CELL_BORDER = 50
_CELLS_PER_PATCH_INNER = 20
_CELLS_IN_PATCH_BORDER = 1
# ``LegacyTractBuilderConfig`` defaults.
_LEGACY_PATCH_INNER = 4000
_LEGACY_PATCH_BORDER = 100
# The ring sky map config shared by both builders (DESIGN.md section 3).
_PIXEL_SCALE_ARCSEC = 0.2
_TRACT_OVERLAP_DEG = 1 / 60
_RA_START_DEG = 0.0

#: The spec keys that decide a skymap's geometry and hash, in the order messages list them.
SKYMAP_CONFIG_KEYS: tuple[str, ...] = (
    "rings",
    "builder",
    "pixel_scale",
    "tract_overlap",
    "ra_start",
    "patch_inner",
    "patch_border",
)


class SkymapLike(Protocol):
    """What `resolve_skymap` reads: a `~drp_campaign.model.spec.SkymapSpec` or the like.

    ``None`` in an optional attribute means the builder's default.
    """

    @property
    def rings(self) -> int: ...
    @property
    def builder(self) -> str: ...
    @property
    def pixel_scale(self) -> float | None: ...
    @property
    def tract_overlap(self) -> float | None: ...
    @property
    def ra_start(self) -> float | None: ...
    @property
    def patch_inner(self) -> int | None: ...
    @property
    def patch_border(self) -> int | None: ...


@dataclass(frozen=True)
class SkyMapConfig:
    """A fully resolved RingsSkyMap config (no defaults left to apply); hashable.

    Attributes
    ----------
    num_rings : `int`
        ``numRings``.
    builder : {"cells", "legacy"}
        ``tractBuilder``.
    pixel_scale_arcsec : `float`
        ``pixelScale``, arcseconds per pixel.
    tract_overlap_deg : `float`
        ``tractOverlap``, degrees.
    ra_start_deg : `float`
        ``raStart``, degrees.
    patch_inner : `int`
        Patch inner size in pixels (legacy ``patchInnerDimensions``; cells:
        ``numCellsPerPatchInner * cellInnerDimensions``).
    patch_border : `int`
        Patch border in pixels (legacy ``patchBorder``; cells:
        ``numCellsInPatchBorder * cellInnerDimensions + cellBorder``).
    """

    num_rings: int
    builder: Builder
    pixel_scale_arcsec: float
    tract_overlap_deg: float
    ra_start_deg: float
    patch_inner: int
    patch_border: int

    def describe(self) -> str:
        """Return the config as the spec keys would spell it, for messages.

        Returns
        -------
        text : `str`
            E.g. ``rings=120, builder=legacy, pixel_scale=0.168, ...``.
        """
        return (
            f"rings={self.num_rings}, builder={self.builder}, "
            f"pixel_scale={self.pixel_scale_arcsec!r}, tract_overlap={self.tract_overlap_deg!r}, "
            f"ra_start={self.ra_start_deg!r}, patch_inner={self.patch_inner}, "
            f"patch_border={self.patch_border}"
        )


def builder_defaults(builder: str) -> dict[str, float | int]:
    """Return what each optional skymap key means when a spec leaves it out.

    Parameters
    ----------
    builder : `str`
        ``cells`` or ``legacy``.

    Returns
    -------
    defaults : `dict` [`str`, `float` or `int`]
        ``pixel_scale`` (arcsec), ``tract_overlap`` (deg), ``ra_start`` (deg), ``patch_inner``
        and ``patch_border`` (pixels).

    Raises
    ------
    ValueError
        Raised for an unknown builder.
    """
    if builder == "cells":
        inner = CELL_INNER * _CELLS_PER_PATCH_INNER
        border = _CELLS_IN_PATCH_BORDER * CELL_INNER + CELL_BORDER
    elif builder == "legacy":
        inner, border = _LEGACY_PATCH_INNER, _LEGACY_PATCH_BORDER
    else:
        raise ValueError(f"unknown tract builder {builder!r}: use 'cells' or 'legacy'")
    return {
        "pixel_scale": _PIXEL_SCALE_ARCSEC,
        "tract_overlap": _TRACT_OVERLAP_DEG,
        "ra_start": _RA_START_DEG,
        "patch_inner": inner,
        "patch_border": border,
    }


def cell_layout(patch_inner: int, patch_border: int) -> tuple[int, int]:
    """Express cells-builder patch sizes as ``CellTractBuilderConfig`` cell counts.

    The cells builder has no patch-size config of its own: a patch is
    ``numCellsPerPatchInner`` cells of ``CELL_INNER`` px and its border is
    ``numCellsInPatchBorder`` cells plus ``CELL_BORDER`` px. The hash packs those counts, so
    only patch sizes that are whole cells describe a real cells skymap.

    Parameters
    ----------
    patch_inner : `int`
        Patch inner size, pixels.
    patch_border : `int`
        Patch border, pixels.

    Returns
    -------
    num_cells_per_patch_inner, num_cells_in_patch_border : `int`
        The two ``CellTractBuilderConfig`` counts.

    Raises
    ------
    ValueError
        Raised if the sizes are not whole cells; the message says which values would be.
    """
    if patch_inner <= 0 or patch_inner % CELL_INNER:
        raise ValueError(
            f"with the cells builder patch_inner must be a positive multiple of the "
            f"{CELL_INNER} px cell (e.g. 3000 = 20 cells), not {patch_inner}"
        )
    extra = patch_border - CELL_BORDER
    if extra < 0 or extra % CELL_INNER:
        raise ValueError(
            f"with the cells builder patch_border must be {CELL_BORDER} px plus whole "
            f"{CELL_INNER} px cells (50, 200, 350, ...), not {patch_border}"
        )
    return patch_inner // CELL_INNER, extra // CELL_INNER


def resolve_config(
    num_rings: int,
    builder: str,
    *,
    pixel_scale: float | None = None,
    tract_overlap: float | None = None,
    ra_start: float | None = None,
    patch_inner: int | None = None,
    patch_border: int | None = None,
) -> SkyMapConfig:
    """Resolve skymap parameters into a full config, applying the builder's defaults.

    Parameters
    ----------
    num_rings : `int`
        ``numRings``.
    builder : `str`
        ``cells`` or ``legacy``.
    pixel_scale, tract_overlap, ra_start : `float`, optional
        Arcsec per pixel, degrees, degrees; `None`: the default.
    patch_inner, patch_border : `int`, optional
        Pixels; `None`: the builder's default.

    Returns
    -------
    config : `SkyMapConfig`
        Floats as floats (a YAML ``pixel_scale: 1`` is the same skymap as ``1.0``).

    Raises
    ------
    ValueError
        Raised for an unknown builder.
    """
    defaults = builder_defaults(builder)

    def pick(value: float | int | None, key: str) -> float | int:
        return defaults[key] if value is None else value

    return SkyMapConfig(
        num_rings=int(num_rings),
        builder="cells" if builder == "cells" else "legacy",
        pixel_scale_arcsec=float(pick(pixel_scale, "pixel_scale")),
        tract_overlap_deg=float(pick(tract_overlap, "tract_overlap")),
        ra_start_deg=float(pick(ra_start, "ra_start")),
        patch_inner=int(pick(patch_inner, "patch_inner")),
        patch_border=int(pick(patch_border, "patch_border")),
    )


def resolve_skymap(skymap: SkymapLike) -> SkyMapConfig:
    """Resolve a spec's skymap into a full config, applying the builder's defaults.

    Parameters
    ----------
    skymap : `SkymapLike`
        Usually ``spec.skymap``.

    Returns
    -------
    config : `SkyMapConfig`

    Raises
    ------
    ValueError
        Raised for an unknown builder.
    """
    return resolve_config(
        skymap.rings,
        skymap.builder,
        pixel_scale=skymap.pixel_scale,
        tract_overlap=skymap.tract_overlap,
        ra_start=skymap.ra_start,
        patch_inner=skymap.patch_inner,
        patch_border=skymap.patch_border,
    )
