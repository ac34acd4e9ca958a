"""Models: where a pipeline comes from (built-ins, folders, single files, hub ids), its family and its components."""
