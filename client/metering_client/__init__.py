"""usage-metering-client: the event models and a client that sends usage over HTTP."""
