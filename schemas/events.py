"""Usage and lifecycle events: the one definition of what an event is.

The models live in the client distribution (``client/metering_client/events.py``, distribution
``usage-metering-client``), so that services emitting usage and the server validate with the very
same code; this module re-exports them for the server's packages.
"""

from metering_client.events import *  # noqa: F403
from metering_client.events import __all__ as __all__
