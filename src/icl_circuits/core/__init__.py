"""The model side: hook sites, family adapters, LM.run, loading, prefix cache, frozen attention, files and ranks."""
