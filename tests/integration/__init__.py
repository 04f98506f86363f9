"""Tests, integration tier: fota in process, real sockets on 127.0.0.1:0, files, threads."""
