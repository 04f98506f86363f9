"""Tools around fota, apart from the library and the application.

The ``fota server`` view (:mod:`fota.tools.server_view`) and the demo
(:mod:`fota.tools.demo`). The CoAP test server and the fleet harness are :mod:`fota.testing`
(docs/architecture.md).
"""
