"""Rules that depend on when an event was received, not only on its shape.

Defined in the client distribution (``client/metering_client/validation.py``), with the event
models they belong to; re-exported here for the server's packages.
"""

from metering_client.validation import *  # noqa: F403
from metering_client.validation import __all__ as __all__
