"""The device's trust: configured keys, the newest keyset, and revocations.

``Config.trust`` holds the manifest-signing keys the device was configured with,
``Config.trust_roots`` the root keys that may sign keysets (``fota.core.keyset``), and
``Config.revoked_keys`` key ids revoked locally. :class:`Trust` applies a keyset to the trust
store the engine and the journal use, in place, and keeps the newest one in
``state_dir/keyset.cose`` (verified again at every start) and every key id any keyset revoked
in ``state_dir/revoked.cbor``, both written atomically: a rotation survives restarts, an older
keyset is never taken again, and a revocation outlives the keyset that made it.

What a keyset does: its keys are the manifest-signing keys from then on. They replace the
keys of the keyset before it and the configured ones: a key it leaves out, a configured
(factory) key included, is retired, so it verifies only the manifests stored before (the
running image's), not a new one. Its revoked key ids verify no new manifest, nor a keyset if
they are root key ids. Revocation is for good: a later keyset cannot lift it (a new key gets
a new key id). Its ``floor-reset``, if any, is the engine's to hand to the state machine
(``KeysetApplied``), which keeps it in the journal record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import cbor2
import structlog

from fota.core import keyset as ks
from fota.core.manifest import PublicKey, TrustStore
from fota.errors import JournalError, ManifestError
from fota.fileops import FileOps

log = structlog.get_logger(__name__)

KEYSET_FILE = "keyset.cose"
REVOKED_FILE = "revoked.cbor"
HISTORY_FILE = "keys.cbor"
"""Every manifest key a keyset brought or retired, ``[kid, alg, key]``: rotated-out keys still
verify the manifests stored before (the running image's), and neither a restart nor a
configuration that no longer lists a retired factory key must forget them."""


class Trust:
    """Applies keysets to a trust store and keeps the newest one on disk.

    Args:
        trust: the manifest-signing keys (changed in place).
        roots: the root keys that sign keysets (revocations applied in place).
        state_dir: where the newest keyset is kept.
        ops: file operations (the journal's, so tests see one ordered log).
        revoked: key ids revoked by configuration.
    """

    def __init__(
        self,
        trust: TrustStore,
        roots: TrustStore,
        state_dir: Path,
        ops: FileOps | None = None,
        *,
        revoked: Iterable[bytes] = (),
    ) -> None:
        self.trust = trust
        self.roots = roots
        self.path = Path(state_dir) / KEYSET_FILE
        self.revoked_path = Path(state_dir) / REVOKED_FILE
        self.history_path = Path(state_dir) / HISTORY_FILE
        self._history: dict[bytes, list[object]] = {}  # kid -> [kid, alg, raw key]
        self.ops = ops or FileOps()
        self.version = 0
        """Version of the keyset applied (0: none)."""
        self.floor_reset: int | None = None
        """The ``floor-reset`` of the keyset applied (None: it sets none, or none applied)."""
        self._configured = set(trust.kids())
        self._from_keyset: set[bytes] = set()
        self._revoked_by_keysets: set[bytes] = set()
        for kid in revoked:
            self._revoke(kid)

    def _revoke(self, kid: bytes) -> None:
        self.trust.revoke(kid)
        self.roots.revoke(kid)

    def load(self) -> None:
        """Apply the stored keyset, the key history and the revocations.

        The stored keyset is taken even if its root was revoked since (it was good when
        taken; setting it aside would reset the version and let older keysets be replayed),
        but then trusts no new key: its keys only verify stored manifests. A damaged keyset
        is logged and left aside. A damaged revocation or history file stops the start
        (``JournalError``): ignoring it would lift revocations or forget the running image's
        key, and the next keyset would overwrite it for good.
        """
        self._load_revoked()
        self._load_history()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            keyset = ks.decode(raw, self.roots, revoked_ok=True)
        except ManifestError as exc:
            log.error("keyset_unusable", path=str(self.path), error=str(exc), kind=exc.kind)
            return
        if self.roots.is_revoked(keyset.signer):
            log.error("keyset_root_revoked", version=keyset.version, signer=keyset.signer.hex())
            # No replay of older ones; its keys stay retired, and it retires none (nor resets
            # the floor): a revoked root decides nothing.
            self.version = keyset.version
            return
        self._apply(keyset)
        # A keyset taken by an earlier version retired the configured keys it leaves out only
        # now: they join the history here, before the configuration may drop them.
        self._remember(self._configured - set(keyset.keys))
        log.info("keyset_loaded", version=keyset.version, signer=keyset.signer.hex())

    def offer(self, raw: bytes) -> ks.Keyset:
        """Verify a keyset, keep it, and apply it.

        Raises:
            ManifestError: it does not verify (the kinds of :func:`fota.core.keyset.decode`),
                or it is not newer than the one applied (``rollback``).
            OSError: it could not be stored; nothing was applied.
        """
        keyset = ks.decode(raw, self.roots)
        if keyset.version <= self.version:
            raise ManifestError(
                "rollback",
                "keyset version",
                f"{keyset.version} is not greater than {self.version} (replay or downgrade)",
            )
        # Stored first: applied but not stored, a restart would forget a revocation. The
        # revocations first of all: the keyset after them may revoke nothing.
        revoked = self._revoked_by_keysets | keyset.revoked
        if revoked != self._revoked_by_keysets:
            self.ops.write_atomic(self.revoked_path, cbor2.dumps(sorted(revoked)))
        self._remember(self._configured - set(keyset.keys), keyset.keys)
        self.ops.write_atomic(self.path, raw)
        self._apply(keyset)
        log.info(
            "keyset_applied",
            version=keyset.version,
            signer=keyset.signer.hex(),
            keys=[kid.hex() for kid in keyset.keys],
            revoked=sorted(kid.hex() for kid in keyset.revoked),
            retired=sorted(kid.hex() for kid in self._configured - set(keyset.keys)),
        )
        if keyset.floor_reset is not None:
            # Rare and powerful: an operator recovering from a stolen key. Loud on purpose.
            log.warning(
                "anti_rollback_floor_reset",
                version=keyset.version,
                floor=keyset.floor_reset,
                signer=keyset.signer.hex(),
            )
        return keyset

    def _read(self, path: Path) -> list[object] | None:
        """A list stored by this class, None when absent; damaged: ``JournalError``."""
        try:
            data = cbor2.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:  # cbor2 raises several types on a damaged file
            raise JournalError(f"{path}: unreadable ({exc}); restore it or remove it") from exc
        if not isinstance(data, list):
            raise JournalError(f"{path}: not a CBOR array; restore it or remove it")
        return data

    def _remember(
        self, retired: Iterable[bytes], added: Mapping[bytes, PublicKey] | None = None
    ) -> None:
        """Add keys to the history file: configured ones being retired, a keyset's new ones.

        A configured key is kept because the configuration may drop it once it is retired
        (tidying up after a rotation), while the running image's manifest is still signed
        by it and must verify at every start.
        """
        entries = {kid: _entry(kid, key) for kid, key in (added or {}).items()}
        for kid in retired:
            key = self.trust.get(kid, retired=True)
            if key is not None and kid not in self._history:
                entries[kid] = _entry(kid, key)
        history = {**self._history, **entries}
        if history != self._history:
            self.ops.write_atomic(self.history_path, cbor2.dumps(list(history.values())))
            self._history = history

    def _load_history(self) -> None:
        entries = self._read(self.history_path) or []
        for entry in entries:
            try:
                if not isinstance(entry, list) or len(entry) != 3:
                    raise ValueError("expected [kid, alg, key]")
                kid, alg, raw = entry
                if not isinstance(kid, bytes) or type(alg) is not int or not isinstance(raw, bytes):
                    raise ValueError("expected [bstr, int, bstr]")
                key = ks.key_from_raw(alg, raw, "history")
            except (ValueError, ManifestError) as exc:
                raise JournalError(f"{self.history_path}: {exc}") from exc
            self._history[kid] = entry
            self.trust.add_retired(kid, key)

    def _load_revoked(self) -> None:
        kids = self._read(self.revoked_path)
        if kids is None:
            return
        for kid in kids:
            if not isinstance(kid, bytes):
                raise JournalError(f"{self.revoked_path}: not an array of key ids")
            self._revoked_by_keysets.add(kid)
            self._revoke(kid)

    def _apply(self, keyset: ks.Keyset) -> None:
        for kid in (self._from_keyset | self._configured) - set(keyset.keys):
            # Rotated out: the keyset no longer lists it. Configured keys too: a factory key
            # that a keyset leaves out must not go on signing updates (docs/security.md).
            self.trust.retire(kid)
        for kid, key in keyset.keys.items():
            self.trust.add(kid, key)
        self._from_keyset = set(keyset.keys)
        for kid in keyset.revoked:
            self._revoked_by_keysets.add(kid)
            self._revoke(kid)
        self.version = keyset.version
        self.floor_reset = keyset.floor_reset


def _entry(kid: bytes, key: PublicKey) -> list[object]:
    alg, raw = ks.raw_of_key(key)
    return [kid, alg, raw]
