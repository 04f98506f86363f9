"""Tests, interop tier (peers we did not write: libcoap, aiocoap-fileserver, RAUC, SWUpdate)."""
