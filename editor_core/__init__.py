"""MEND model editing: gradient factors, editor networks, exact low-rank weight deltas.

A pure library: it never imports the service layer or its HTTP/Redis dependencies.
"""

from editor_core.delta import EditDelta, LowRankUpdate
from editor_core.requests import EditRequest
from editor_core.stack import EditStack

__all__ = ["EditDelta", "EditRequest", "EditStack", "LowRankUpdate"]
