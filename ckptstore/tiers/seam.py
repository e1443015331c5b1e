"""Where a save goes, as the save path sees it: the one seam for tiers.

A save builds its :class:`SaveTarget` once, from the store it was given
(:func:`save_target`), and asks it everything that depends on tiers: where the manifest
commits, which URL names the checkpoint for every rank, where a helper process writes the
data, which ranks agree on a replication, whether the shared tier is fed straight from the
staging buffer, and what follows the commit. A single store is a :class:`SaveTarget`; a store
with tiers (:meth:`Store.tiers`) is a :class:`TieredTarget`. A new tier plugs in here, not in
the save, commit or async code.
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ckptstore.backends.base import Store
from ckptstore.errors import KeyExistsError
from ckptstore.format.manifest import MANIFEST_KEY

if TYPE_CHECKING:
    from ckptstore.coordination.collectives import Coordinator
    from ckptstore.format.data_files import FilePlan, WriteItem, WriteResult
    from ckptstore.tiers.replicator import ReplicationHandle


class SaveTarget:
    """A save into one store: it commits there, and nothing follows the commit."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def commit_store(self) -> Store:
        """Where the manifest is committed (and the in-flight marker kept)."""
        return self.store

    @property
    def shared_url(self) -> str:
        """The checkpoint's name, equal on every rank of one save."""
        return self.store.url

    @property
    def data_store(self) -> Store:
        """Where a helper process (``persist="process"``) writes this rank's data files."""
        return self.store

    @property
    def holds_every_rank(self) -> bool:
        """The commit store holds every rank's data files (so the commit can check them)."""
        return True

    @property
    def marks_every_node(self) -> bool:
        """Each node keeps its own in-flight marker (removed after its own commit)."""
        return False

    @property
    def wants_manifest(self) -> bool:
        """Every rank needs the committed manifest's bytes (:meth:`after_commit`)."""
        return False

    def replication_team(self, process_group: Any) -> Any:
        """The ranks that agree on this save's replication; None without a shared tier."""
        return None

    def stream_upload(self, items: list[WriteItem], plan: FilePlan) -> Future | None:
        """Start feeding the shared tier from the staging buffer's ``items`` while they are
        written locally; None when there is no shared tier."""
        return None

    def discard_streamed(self, upload: Future) -> None:
        """Remove what :meth:`stream_upload` wrote once it ends (the save failed)."""

    def after_commit(
        self,
        manifest_bytes: bytes | None,
        coord: Coordinator,
        overwrite: bool,
        team: Any,
        streamed: Future | None,
        index: tuple[str, bytes] | None = None,
        written: WriteResult | None = None,
    ) -> ReplicationHandle | None:
        """Every rank, once the coordinator committed the manifest (its bytes when
        :attr:`wants_manifest`, and the chunk index's key and bytes if it has one);
        ``written``: this rank's write in the save."""
        return None


class TieredTarget(SaveTarget):
    """A save into a node-local tier in front of a shared one: every node commits on its
    local tier; the replicator copies the checkpoint to the shared tier in the background."""

    def __init__(self, store: Store, local: Store, remote: Store) -> None:
        super().__init__(store)
        self.local, self.remote = local, remote

    @property
    def commit_store(self) -> Store:
        return self.local

    @property
    def shared_url(self) -> str:
        return self.remote.url

    @property
    def data_store(self) -> Store:
        return self.local

    @property
    def holds_every_rank(self) -> bool:
        return False

    @property
    def marks_every_node(self) -> bool:
        return True

    @property
    def wants_manifest(self) -> bool:
        return True

    def replication_team(self, process_group: Any) -> Any:
        from ckptstore.tiers.replicator import replicator

        return replicator().team_for(process_group)

    def stream_upload(self, items: list[WriteItem], plan: FilePlan) -> Future:
        from ckptstore.tiers.replicator import start_streamed_upload

        return start_streamed_upload(self.remote, items, plan)

    def discard_streamed(self, upload: Future) -> None:
        """Delete this save's streamed files from the shared tier once the upload has ended
        (their names are unique to this save; an aborted upload left nothing)."""
        remote = self.remote

        def discard(done: Future) -> None:
            if done.exception() is None:
                for key in done.result():
                    with contextlib.suppress(Exception):  # best effort; `ckpt gc` finds the rest
                        remote.delete(key)

        upload.add_done_callback(discard)

    def after_commit(
        self,
        manifest_bytes: bytes | None,
        coord: Coordinator,
        overwrite: bool,
        team: Any,
        streamed: Future | None,
        index: tuple[str, bytes] | None = None,
        written: WriteResult | None = None,
    ) -> ReplicationHandle:
        """Put the committed manifest (and its chunk index, before it) on every node's local
        tier, then queue the upload."""
        from ckptstore.tiers.replicator import replicator
        from ckptstore.tiers.state import REPLICATING, TierState, write_tier_state

        assert manifest_bytes is not None

        if not coord.is_coordinator:  # the coordinator's node has it already
            try:
                if index is not None and not self.local.exists(index[0]):
                    self.local.write(index[0], index[1])
                if overwrite:
                    self.local.write(MANIFEST_KEY, manifest_bytes)
                elif not self.local.exists(MANIFEST_KEY):
                    self.local.write_if_absent(MANIFEST_KEY, manifest_bytes)
            except KeyExistsError:
                pass  # another rank of this node wrote the same manifest
            except Exception as exc:  # the checkpoint is committed; this node's copy is not
                warnings.warn(
                    f"{self.local.url}: could not write the local manifest ({exc}); this "
                    "node's tier-0 copy will be loadable once replicated",
                    stacklevel=3,
                )
        write_tier_state(self.local, TierState(self.remote.url, REPLICATING))
        return replicator().submit(
            self.store, manifest_bytes, team, overwrite, streamed=streamed, written=written
        )


def save_target(store: Store) -> SaveTarget:
    """The target of a save into ``store``."""
    tiers = store.tiers()
    if tiers is None:
        return SaveTarget(store)
    return TieredTarget(store, *tiers)
