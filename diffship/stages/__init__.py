"""The build's stages over one build context: compress, export, calibrate, compile, validate.

`build.build` runs them all into an output folder; `build.run_unit` runs one into the cache (a farm task)."""
