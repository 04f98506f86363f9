"""The application around the library: the ``fota`` program.

Its commands (:mod:`fota.app.cli`, :mod:`fota.app.cli_control`), the daemon under systemd
(:mod:`fota.app.daemon`, :mod:`fota.app.systemd`), its TOML settings
(:mod:`fota.app.settings`), the control socket (:mod:`fota.app.control`), the hook-command
handler (:mod:`fota.app.command_handler`) and the log set-up (:mod:`fota.app.logs`). The
library below (``fota``'s other modules) imports none of it (docs/architecture.md).
"""
