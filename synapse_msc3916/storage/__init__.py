"""De-duplicated media storage: a Synapse media storage provider and its tools."""
