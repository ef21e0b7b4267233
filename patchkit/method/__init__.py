"""patchkit.method: from a model to a patch (targets, data, features, probes, selection)."""
