"""Tests, e2e tier: fota itself runs as a subprocess (daemon, fota run/fetch/server, fleet)."""
