"""What a run leaves on disk: the one atomic write and strict JSON (:mod:`.fileio`),
training checkpoints (:mod:`.checkpoint`) and the locked run directory
(:mod:`.rundir`)."""
