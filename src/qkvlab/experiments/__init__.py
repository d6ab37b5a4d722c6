"""One module per paper claim: the reproduction grids behind `qkvlab repro`."""
