"""What a build keeps: the content-addressed cache, the output folder's files, the manifest, and the
confinement of the paths a manifest names."""
