"""WSGI entry point of the local Rucio server: Rucio's application with one schema fix.

Multi-VO mode (one isolated namespace per test, see launcher.py) makes the server use the
``generic_multi_vo`` schema, whose ``SCOPE_NAME_REGEXP`` is ``/(.*)/(.*)``: greedy, it splits a
REST path ``dp2/raw/LSSTCam/x.fits`` at the *last* slash (scope ``dp2/raw/LSSTCam``), so no DID
name with a ``/`` -- every Butler path -- can be read back. The single-VO ``generic`` schema splits
at the first slash, which is what a scope (no ``/`` allowed) requires; we use that one. A policy
package could do the same, but Rucio only reads them per VO from rucio.cfg, and our VOs are
created while the server runs.

    gunicorn --chdir scripts/rucio_local wsgi:application
"""

import rucio.common.schema.generic as _generic
import rucio.common.schema.generic_multi_vo as _multi_vo

_multi_vo.SCOPE_NAME_REGEXP = _generic.SCOPE_NAME_REGEXP

from rucio.web.rest.flaskapi.v1.main import application  # noqa: E402

__all__ = ["application"]
