"""Everything that runs while training: config, data loading, losses, engine, train loop."""
