"""The deployment package's one error type."""
from __future__ import annotations

from tomtit.errors import TomtitError


class DeployError(TomtitError, ValueError):
    """A topology, credential file or output folder that cannot be used; the message names the
    file and field at fault."""
