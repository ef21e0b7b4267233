"""patchkit.share: patches and checkpoints to and from the Hugging Face Hub."""
