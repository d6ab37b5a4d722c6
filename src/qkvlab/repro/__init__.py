"""One package per paper claim, behind `qkvlab repro` (and `qkvlab theory`): each holds its settings, its runs,
its aggregation and its rendering; claims register in :mod:`.registry`."""
