"""Image sources: each returns an :class:`harness.types.ImageSet`."""
