"""vatp launch layer: the `vatp` CLI, experiment recipes and cluster launch scripts."""
