"""Running a set of deployed artifacts end to end: prompt -> image, any backend."""
