"""L3, what a user does with a vector: check it fits (:mod:`.plan`), apply it live
(:mod:`.live`, MoE through :mod:`.conversion`) or on disk (:mod:`.disk`), verify it against its
sources (:mod:`.verify`), describe it (:mod:`.summary`). Operations take sources and
checkpoints, never Hub ids: resolution happens above, in :mod:`rvhub.hub`."""
