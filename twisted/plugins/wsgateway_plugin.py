# No __init__.py beside this file, on purpose: Twisted's own twisted/plugins
# package extends its search path to every twisted/plugins directory without one.
from twisted.application.service import ServiceMaker

wsgateway = ServiceMaker(
    "wsgateway",
    "wsgateway.tap",
    "WebSocket gateway: authenticate, route, balance and relay WebSocket connections",
    "wsgateway",
)
