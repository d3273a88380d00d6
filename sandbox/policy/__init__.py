"""Host-side policy work: generation from a group spec, summaries, diffs and trace replay."""
