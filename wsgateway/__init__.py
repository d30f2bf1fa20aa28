"""wsgateway: a WebSocket gateway daemon on Twisted and Autobahn."""

__version__ = "0.1.0"
