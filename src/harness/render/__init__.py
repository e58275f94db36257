"""Drawing attributions onto images."""
