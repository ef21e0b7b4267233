"""patchkit.core: checkpoints, patch files and the operations on them (numpy only)."""
