"""The run's configuration, typed in one package: the sections (:mod:`.sections`), the checks
across them (:mod:`.validate`), the sweep they plan (:mod:`.sweep`), a run's identity
(:mod:`.identity`) and the session's configuration (:mod:`.active`)."""
